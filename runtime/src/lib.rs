//! Cairn: a portable on-device LLM inference runtime.
//!
//! Layers, bottom up: [`weights`] maps model files (with [`bitstack`]'s budgets);
//! [`backend`] computes; [`model`] defines architectures against the backend trait;
//! [`longctx`] runs long prompts on a budget; [`engine`] ties a model to its tokenizer
//! and template for generation; the front ends (CLI, bench, convert, pull) sit on top.
//! A module uses only its own layer and those below (docs/ARCHITECTURE.md, enforced by
//! `tests/layers.rs`).

pub mod backend;
pub mod bench;
pub mod bitstack;
pub mod chat;
#[cfg(feature = "cli")]
pub mod cli;
#[cfg(feature = "cli")]
pub mod convert;
pub mod energy;
pub mod engine;
pub mod error;
pub mod longctx;
pub mod model;
pub mod needle;
#[cfg(feature = "cli")]
pub mod pull;
pub mod route;
pub mod sampling;
#[cfg(feature = "server")]
pub mod server;
pub mod synthetic;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
