//! Criterion benchmarks live in `benches/`; the side-by-side runner against llama.cpp
//! is `side_by_side.sh`. This library is empty: it exists so the benchmarks have a crate.
