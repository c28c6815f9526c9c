//! `include/cairn.h` must be what cbindgen generates from the current source: a stale
//! header would let C callers compile against functions or structs that no longer
//! exist or have changed layout. `CAIRN_BLESS=1` rewrites it.

use std::path::Path;

#[test]
fn header_is_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen could not generate the header")
        .write(&mut generated);
    let generated = String::from_utf8(generated).expect("header is UTF-8");
    let path = dir.join("include/cairn.h");
    if std::env::var_os("CAIRN_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write include/cairn.h");
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    if checked_in != generated {
        let first = checked_in.lines().zip(generated.lines()).position(|(a, b)| a != b);
        let line = first.unwrap_or_else(|| checked_in.lines().count().min(generated.lines().count()));
        panic!(
            "ffi/include/cairn.h is stale (first difference at line {}):\n  checked in: {:?}\n  generated:  {:?}\n\
             regenerate it with: CAIRN_BLESS=1 cargo test -p cairn-ffi --test header",
            line + 1,
            checked_in.lines().nth(line).unwrap_or("<end of file>"),
            generated.lines().nth(line).unwrap_or("<end of file>"),
        );
    }
}
