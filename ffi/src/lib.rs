//! The C ABI of Cairn, shaped like llama.cpp's `llama.h` so that app developers find
//! what they know: opaque handles with explicit lifetimes, plain parameter structs with
//! default constructors, and a status code from every call.
//!
//! Handles are not pointers to memory: they are ids in a registry, so a freed, foreign
//! or made-up handle is reported (`CAIRN_ERR_INVALID_HANDLE`) instead of being
//! dereferenced, and a double free is an error rather than heap corruption. Every entry
//! point runs inside `catch_unwind`: no panic crosses the boundary.
//!
//! `include/cairn.h` is generated from this file by cbindgen (`tests/header.rs` checks it
//! is current), so the doc comments here are the header's documentation.
#![allow(non_camel_case_types)]

mod handles;
mod logging;

use std::ffi::{c_char, c_void, CStr};
use std::ops::ControlFlow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use cairn::backend::BackendKind;
use cairn::chat::Message;
use cairn::engine::{Engine, EngineOptions};
use cairn::sampling::{Sampler, SamplerConfig};
use cairn::weights::ModelFile;

use handles::{Context, ErrorSlot, Failure, Model, R};

/// A status code: `CAIRN_OK` (0) or one of the negative `CAIRN_ERR_*` codes. After an
/// error, `cairn_last_error()` (this thread) or `cairn_model_last_error()` /
/// `cairn_context_last_error()` (that handle) give a message.
pub type cairn_status = i32;
pub const CAIRN_OK: cairn_status = 0;
/// A required pointer argument was NULL.
pub const CAIRN_ERR_NULL_ARGUMENT: cairn_status = -1;
/// The handle is not live: already freed, never created, or of the other kind.
pub const CAIRN_ERR_INVALID_HANDLE: cairn_status = -2;
/// An argument has a bad value: text that is not UTF-8, a token outside the
/// vocabulary, a prompt longer than the context, an unknown enum value, ...
pub const CAIRN_ERR_INVALID_ARGUMENT: cairn_status = -3;
/// The output buffer is too small; the `out_len`/`n_tokens` argument says how much is
/// needed (text lengths exclude the terminating NUL, which also needs room).
pub const CAIRN_ERR_BUFFER_TOO_SMALL: cairn_status = -4;
/// Reading the model file failed (missing file, permissions, ...).
pub const CAIRN_ERR_IO: cairn_status = -5;
/// The file is not a well-formed model file.
pub const CAIRN_ERR_FORMAT: cairn_status = -6;
/// The file is well formed but describes a model Cairn cannot run.
pub const CAIRN_ERR_MODEL: cairn_status = -7;
/// The tokenizer or chat template failed.
pub const CAIRN_ERR_TEXT: cairn_status = -8;
/// The model has no (usable) chat template: chat in raw completion instead.
pub const CAIRN_ERR_NO_TEMPLATE: cairn_status = -9;
/// The feature exists in the ABI but not for this model or build (memory budgets on a
/// model that is not BitStack, the GPU backend, GemFilter).
pub const CAIRN_ERR_UNSUPPORTED: cairn_status = -10;
/// The progress callback asked to cancel the load.
pub const CAIRN_ERR_CANCELLED: cairn_status = -11;
/// Another thread is using this context right now.
pub const CAIRN_ERR_BUSY: cairn_status = -12;
/// A callback panicked (only callbacks written in a language that unwinds can).
pub const CAIRN_ERR_CALLBACK: cairn_status = -13;
/// An internal error (a panic inside Cairn) was caught; the handle stays usable, but a
/// context loses its cached tokens.
pub const CAIRN_ERR_INTERNAL: cairn_status = -14;

/// A token id (non-negative; `-1` marks "no token" where documented).
pub type cairn_token = i32;

/// Which compute backend a model runs on.
pub type cairn_backend = i32;
/// The GPU on a real adapter when the build has one, else the CPU.
pub const CAIRN_BACKEND_AUTO: cairn_backend = 0;
pub const CAIRN_BACKEND_CPU: cairn_backend = 1;
/// The wgpu backend (Vulkan/Metal); `CAIRN_ERR_UNSUPPORTED` in builds without the
/// `wgpu` feature.
pub const CAIRN_BACKEND_GPU: cairn_backend = 2;

/// Why a generation ended.
pub type cairn_stop_reason = i32;
/// The model produced an end-of-generation token.
pub const CAIRN_STOP_EOG: cairn_stop_reason = 0;
/// `max_tokens` were generated.
pub const CAIRN_STOP_LENGTH: cairn_stop_reason = 1;
/// The context is full.
pub const CAIRN_STOP_CONTEXT_FULL: cairn_stop_reason = 2;
/// The token callback returned false.
pub const CAIRN_STOP_CALLBACK: cairn_stop_reason = 3;
/// `cairn_context_abort()` was called.
pub const CAIRN_STOP_ABORTED: cairn_stop_reason = 4;

/// Log levels, most severe first.
pub type cairn_log_level = i32;
pub const CAIRN_LOG_ERROR: cairn_log_level = 1;
pub const CAIRN_LOG_WARN: cairn_log_level = 2;
pub const CAIRN_LOG_INFO: cairn_log_level = 3;
pub const CAIRN_LOG_DEBUG: cairn_log_level = 4;

/// Version of this ABI: bumped on every incompatible change of a function or struct.
pub const CAIRN_ABI_VERSION: u32 = 1;

/// A loaded model: weights, tokenizer and chat template. Immutable once loaded, so
/// every function taking a model may be called from any number of threads at once.
pub struct cairn_model {
    _private: [u8; 0],
}

/// One sequence's state (its KV cache and the tokens in it). One thread at a time:
/// a second concurrent call gets `CAIRN_ERR_BUSY`; only `cairn_context_abort()` is
/// meant for other threads. A context keeps its model alive: the model may be freed
/// first, its memory goes with the last context.
pub struct cairn_context {
    _private: [u8; 0],
}

/// Load progress in [0, 1]; return false to cancel the load (`CAIRN_ERR_CANCELLED`).
/// Called on the loading thread.
pub type cairn_progress_callback = Option<unsafe extern "C-unwind" fn(progress: f32, user_data: *mut c_void) -> bool>;

/// Called for every generated token on the generating thread. `piece` is the text the
/// token completes: UTF-8, `piece_len` bytes, NUL-terminated, valid only during the
/// call, empty while a multi-byte character is incomplete. The last call may have token
/// -1: text that was held back at the end. Return false to stop.
pub type cairn_token_callback = Option<
    unsafe extern "C-unwind" fn(
        token: cairn_token,
        piece: *const c_char,
        piece_len: usize,
        user_data: *mut c_void,
    ) -> bool,
>;

/// Receives log messages (NUL-terminated, valid only during the call) from any thread
/// that calls into Cairn.
pub type cairn_log_callback =
    Option<unsafe extern "C-unwind" fn(level: cairn_log_level, message: *const c_char, user_data: *mut c_void)>;

/// How to load a model. Start from `cairn_model_params_default()`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct cairn_model_params {
    /// `CAIRN_BACKEND_*`.
    pub backend: cairn_backend,
    /// CPU threads for this model's compute pool, shared by all its contexts (0: one
    /// per core).
    pub n_threads: u32,
    /// The f32 reference path: weights dequantized, activations never quantized.
    /// Slower; free of 8-bit activation noise.
    pub exact: bool,
    /// Bytes the model may use, for BitStack models. Must be 0 (no budget) for other
    /// models: `CAIRN_ERR_UNSUPPORTED` otherwise.
    pub memory_budget: u64,
    /// Optional; see `cairn_progress_callback`.
    pub progress_callback: cairn_progress_callback,
    pub progress_user_data: *mut c_void,
}

/// How to create a context. Start from `cairn_context_params_default()`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct cairn_context_params {
    /// Tokens the context holds (0: the model's training context). Memory grows with it.
    pub n_ctx: u32,
    /// Reserved for GemFilter long-prompt filtering: must be false until it lands
    /// (`CAIRN_ERR_UNSUPPORTED`).
    pub gemfilter: bool,
    /// Reserved (GemFilter): prompt tokens to keep; default 1024.
    pub gemfilter_top_k: u32,
    /// Reserved (GemFilter): the filter layer, -1 for automatic; default -1.
    pub gemfilter_layer: i32,
}

/// Sampling settings; `cairn_sampler_params_default()` gives llama.cpp's defaults.
/// Chain: penalties, top-k, top-p, min-p, temperature, draw.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct cairn_sampler_params {
    /// <= 0: greedy (argmax).
    pub temperature: f32,
    /// 0 keeps all.
    pub top_k: i32,
    /// 1 keeps all.
    pub top_p: f32,
    /// 0 keeps all.
    pub min_p: f32,
    /// 1 disables.
    pub repeat_penalty: f32,
    /// Tokens of history the penalties look at; 0 disables them.
    pub repeat_last_n: i32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Same seed, same prompt, same settings: same tokens.
    pub seed: u64,
}

/// One chat message for `cairn_chat_apply_template()`: NUL-terminated UTF-8.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct cairn_chat_message {
    /// "system", "user" or "assistant".
    pub role: *const c_char,
    pub content: *const c_char,
}

/// What `cairn_generate()` did.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct cairn_generation {
    /// Tokens generated (end-of-generation tokens are not counted).
    pub n_tokens: usize,
    /// Prompt tokens found in the context's cache and not evaluated again.
    pub n_prompt_reused: usize,
    /// `CAIRN_STOP_*`.
    pub stop_reason: cairn_stop_reason,
}

/// Facts about a loaded model.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct cairn_model_info {
    /// Tokens in the tokenizer's vocabulary.
    pub n_vocab: u32,
    /// The context length the model was trained for.
    pub n_ctx_train: u32,
    pub n_layer: u32,
    pub n_embd: u32,
    /// -1 when the model has none.
    pub token_bos: cairn_token,
    /// -1 when the model has none.
    pub token_eos: cairn_token,
    /// Whether the model carries a chat template Cairn can render.
    pub has_chat_template: bool,
    /// Whether the memory budget can change (true for BitStack models, made by `cairn stack`).
    pub supports_memory_budget: bool,
}

// ---------------------------------------------------------------------------------
// Entry-point plumbing

/// Runs an entry point's body: a panic becomes `CAIRN_ERR_INTERNAL`, a failure is
/// recorded for `cairn_last_error()` and on the handle the body looked up.
fn run(body: impl FnOnce(&mut Option<Arc<ErrorSlot>>) -> R<()>) -> cairn_status {
    let mut slot = None;
    let failure = match catch_unwind(AssertUnwindSafe(|| body(&mut slot))) {
        Ok(Ok(())) => return CAIRN_OK,
        Ok(Err(f)) => f,
        Err(panic) => Failure::new(CAIRN_ERR_INTERNAL, format!("internal error: {}", panic_message(&panic))),
    };
    handles::set_thread_error(&failure.message);
    if let Some(slot) = slot {
        slot.set(&failure.message);
    }
    log::debug!("cairn: {}", failure.message);
    failure.status
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_string()
    }
}

fn null(what: &str) -> Failure {
    Failure::new(CAIRN_ERR_NULL_ARGUMENT, format!("{what} is NULL"))
}

fn invalid(msg: impl Into<String>) -> Failure {
    Failure::new(CAIRN_ERR_INVALID_ARGUMENT, msg)
}

/// # Safety
/// `p` is NULL or points to a NUL-terminated string that outlives the call.
unsafe fn c_str<'a>(p: *const c_char, what: &str) -> R<&'a str> {
    if p.is_null() {
        return Err(null(what));
    }
    // SAFETY: non-null and NUL-terminated by the caller's contract.
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    std::str::from_utf8(bytes).map_err(|e| invalid(format!("{what} is not UTF-8: {e}")))
}

/// # Safety
/// `p` is NULL or points to `n` readable `T`s.
unsafe fn slice<'a, T>(p: *const T, n: usize, what: &str) -> R<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(null(what));
    }
    // SAFETY: non-null, `n` elements readable by the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// Write `v` through an out pointer that must not be NULL.
///
/// # Safety
/// `p` is NULL or valid for a write of `T`.
unsafe fn put<T>(p: *mut T, v: T, what: &str) -> R<()> {
    if p.is_null() {
        return Err(null(what));
    }
    // SAFETY: non-null and writable by the caller's contract.
    unsafe { p.write(v) };
    Ok(())
}

/// Copy `bytes` and a NUL into `buf` (`size` bytes). `*out_len` (if not NULL) always
/// receives the length without the NUL, so a call with a too-small buffer says how much
/// is needed.
///
/// # Safety
/// `buf` is NULL or writable for `size` bytes; `out_len` is NULL or writable.
unsafe fn write_text(bytes: &[u8], buf: *mut c_char, size: usize, out_len: *mut usize) -> R<()> {
    if !out_len.is_null() {
        // SAFETY: non-null and writable by the caller's contract.
        unsafe { out_len.write(bytes.len()) };
    }
    if size > 0 && buf.is_null() {
        return Err(null("buf"));
    }
    if size < bytes.len() + 1 {
        return Err(Failure::new(
            CAIRN_ERR_BUFFER_TOO_SMALL,
            format!("the buffer holds {size} bytes; {} are needed (with the NUL)", bytes.len() + 1),
        ));
    }
    // SAFETY: `buf` is writable for `size` >= len + 1 bytes and cannot overlap `bytes`,
    // which Cairn owns.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), bytes.len());
        buf.add(bytes.len()).write(0);
    }
    Ok(())
}

fn token_ids(tokens: &[cairn_token], n_vocab: usize) -> R<Vec<u32>> {
    tokens
        .iter()
        .map(|&t| match u32::try_from(t) {
            Ok(id) if (id as usize) < n_vocab => Ok(id),
            _ => Err(invalid(format!("token {t} is outside the vocabulary of {n_vocab}"))),
        })
        .collect()
}

// ---------------------------------------------------------------------------------
// Library

/// The library version, e.g. "0.1.0". Static storage.
#[no_mangle]
pub extern "C" fn cairn_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// `CAIRN_ABI_VERSION` of the library actually linked, to compare with the header's.
#[no_mangle]
pub extern "C" fn cairn_abi_version() -> u32 {
    CAIRN_ABI_VERSION
}

/// Version, target, build profile and backends, one line. Static storage.
#[no_mangle]
pub extern "C" fn cairn_build_info() -> *const c_char {
    static INFO: std::sync::OnceLock<std::ffi::CString> = std::sync::OnceLock::new();
    INFO.get_or_init(|| {
        let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
        let line = format!(
            "cairn {} ({}-{}, {profile}, abi {CAIRN_ABI_VERSION}); backends: cpu",
            env!("CARGO_PKG_VERSION"),
            std::env::consts::ARCH,
            std::env::consts::OS
        );
        std::ffi::CString::new(line).unwrap_or_default()
    })
    .as_ptr()
}

/// Route Cairn's log messages at `level` or more severe to `callback` (NULL: back to
/// warnings and errors on stderr). Until the first call, Cairn logs nothing. Process-wide.
#[no_mangle]
pub extern "C" fn cairn_set_log_callback(
    callback: cairn_log_callback,
    user_data: *mut c_void,
    level: cairn_log_level,
) -> cairn_status {
    run(|_| {
        if !(0..=CAIRN_LOG_DEBUG).contains(&level) {
            return Err(invalid(format!("log level {level} is not a CAIRN_LOG_* value")));
        }
        logging::set(callback, user_data, level);
        Ok(())
    })
}

/// The message of the last failed call on this thread ("" if none). Valid until the
/// next failed call on this thread.
#[no_mangle]
pub extern "C" fn cairn_last_error() -> *const c_char {
    handles::thread_error()
}

/// How many model and context handles are live (loaded or created, not yet freed): a
/// leak check for apps and tests, since the registry keeps a forgotten handle reachable
/// where a memory checker would not call it lost.
///
/// # Safety
/// `out_n_models` and `out_n_contexts` are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn cairn_live_handles(out_n_models: *mut usize, out_n_contexts: *mut usize) -> cairn_status {
    run(|_| {
        let (models, contexts) = handles::live();
        if !out_n_models.is_null() {
            // SAFETY: non-null, writable by the caller's contract.
            unsafe { out_n_models.write(models) };
        }
        if !out_n_contexts.is_null() {
            // SAFETY: non-null, writable by the caller's contract.
            unsafe { out_n_contexts.write(contexts) };
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------
// Model

/// CPU backend, all cores, integer kernels, no budget, no progress callback.
#[no_mangle]
pub extern "C" fn cairn_model_params_default() -> cairn_model_params {
    cairn_model_params {
        backend: CAIRN_BACKEND_AUTO,
        n_threads: 0,
        exact: false,
        memory_budget: 0,
        progress_callback: None,
        progress_user_data: std::ptr::null_mut(),
    }
}

/// Load a GGUF model. On success `*out_model` is a new handle to free with
/// `cairn_model_free()`; on failure it is NULL. `params` may be NULL (defaults).
///
/// # Safety
/// `path` is a NUL-terminated string; `params` is NULL or valid; `out_model` is writable.
#[no_mangle]
pub unsafe extern "C" fn cairn_model_load(
    path: *const c_char,
    params: *const cairn_model_params,
    out_model: *mut *mut cairn_model,
) -> cairn_status {
    run(|_| {
        // SAFETY: caller's contract.
        unsafe { put(out_model, std::ptr::null_mut(), "out_model")? };
        // SAFETY: caller's contract.
        let path = unsafe { c_str(path, "path")? };
        // SAFETY: NULL or a valid struct by the caller's contract.
        let params = unsafe { params.as_ref() }.copied().unwrap_or_else(|| cairn_model_params_default());
        let backend = match params.backend {
            // Probing for a GPU loads the Vulkan/Metal driver: only in builds that can use it.
            CAIRN_BACKEND_AUTO if cfg!(feature = "wgpu") => BackendKind::Auto,
            CAIRN_BACKEND_AUTO => BackendKind::Cpu,
            CAIRN_BACKEND_CPU => BackendKind::Cpu,
            CAIRN_BACKEND_GPU if cfg!(feature = "wgpu") => BackendKind::Wgpu,
            CAIRN_BACKEND_GPU => {
                return Err(Failure::new(
                    CAIRN_ERR_UNSUPPORTED,
                    "this build has no GPU backend (build cairn-ffi with the `wgpu` feature)",
                ))
            }
            other => return Err(invalid(format!("backend {other} is not a CAIRN_BACKEND_* value"))),
        };
        let progress = |p: f32| -> R<()> {
            let Some(cb) = params.progress_callback else { return Ok(()) };
            // SAFETY: the caller provided the callback and its user data together.
            match catch_unwind(AssertUnwindSafe(|| unsafe { cb(p, params.progress_user_data) })) {
                Ok(true) => Ok(()),
                Ok(false) => Err(Failure::new(CAIRN_ERR_CANCELLED, "the progress callback cancelled the load")),
                Err(_) => Err(Failure::new(CAIRN_ERR_CALLBACK, "the progress callback panicked")),
            }
        };
        progress(0.0)?;
        let file = ModelFile::open(Path::new(path))?;
        progress(0.1)?;
        if params.memory_budget != 0 && file.stack.is_none() {
            return Err(Failure::new(
                CAIRN_ERR_UNSUPPORTED,
                "a memory budget needs a BitStack model (made by `cairn stack`); pass memory_budget = 0",
            ));
        }
        let memory = (params.memory_budget != 0).then_some(params.memory_budget);
        let opts = EngineOptions {
            threads: params.n_threads as usize,
            exact: params.exact,
            backend,
            memory,
            context: 0,
            ..Default::default()
        };
        let engine = Engine::from_file(file, &opts)?;
        progress(1.0)?;
        log::info!("cairn: loaded {path} ({})", engine.runner.backend_name());
        let handle = handles::register_model(Model::new(engine));
        // SAFETY: checked writable above.
        unsafe { out_model.write(handle) };
        Ok(())
    })
}

/// Free a model. Contexts created from it stay usable; the memory goes with the last
/// of them. Freeing NULL is a no-op; freeing twice returns `CAIRN_ERR_INVALID_HANDLE`.
#[no_mangle]
pub extern "C" fn cairn_model_free(model: *mut cairn_model) -> cairn_status {
    run(|_| {
        if model.is_null() {
            return Ok(());
        }
        handles::free_model(model)
    })
}

/// The message of the last failed call on this model (from any thread), "" if none.
/// Valid until the next failed call on the model or its free.
#[no_mangle]
pub extern "C" fn cairn_model_last_error(model: *const cairn_model) -> *const c_char {
    match handles::model(model) {
        Ok(m) => m.errors.get(),
        Err(_) => c"not a live model handle".as_ptr(),
    }
}

/// # Safety
/// `out_info` is writable.
#[no_mangle]
pub unsafe extern "C" fn cairn_model_get_info(
    model: *const cairn_model,
    out_info: *mut cairn_model_info,
) -> cairn_status {
    run(|slot| {
        let m = handles::model(model)?;
        *slot = Some(m.errors.clone());
        let e = &m.engine;
        let cfg = e.runner.config();
        let tok = |id: Option<u32>| id.map_or(-1, |i| i as cairn_token);
        let info = cairn_model_info {
            n_vocab: e.tokenizer.vocab_size() as u32,
            n_ctx_train: cfg.context as u32,
            n_layer: cfg.n_layers as u32,
            n_embd: cfg.dim as u32,
            token_bos: tok(e.tokenizer.bos_id()),
            token_eos: tok(e.tokenizer.eos_id()),
            has_chat_template: e.template.is_ok(),
            supports_memory_budget: e.file.stack.is_some(),
        };
        // SAFETY: caller's contract.
        unsafe { put(out_info, info, "out_info") }
    })
}

/// A one-line description (architecture, size, backend) into `buf`; see
/// `CAIRN_ERR_BUFFER_TOO_SMALL` for sizing.
///
/// # Safety
/// `buf` is writable for `size` bytes (or NULL with size 0); `out_len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn cairn_model_describe(
    model: *const cairn_model,
    buf: *mut c_char,
    size: usize,
    out_len: *mut usize,
) -> cairn_status {
    run(|slot| {
        let m = handles::model(model)?;
        *slot = Some(m.errors.clone());
        // SAFETY: caller's contract.
        unsafe { write_text(m.description.as_bytes(), buf, size, out_len) }
    })
}

/// Change the memory budget of a BitStack model while it runs: only the blocks that
/// join are read, and the pages of those that leave are released. Every other model
/// returns `CAIRN_ERR_UNSUPPORTED` and is unchanged.
#[no_mangle]
pub extern "C" fn cairn_model_set_memory_budget(model: *mut cairn_model, bytes: u64) -> cairn_status {
    run(|slot| {
        let m = handles::model(model)?;
        *slot = Some(m.errors.clone());
        if m.engine.file.stack.is_none() {
            return Err(Failure::new(
                CAIRN_ERR_UNSUPPORTED,
                format!("cannot set a memory budget of {bytes} bytes: this is not a BitStack model"),
            ));
        }
        let plan = m.engine.set_memory_budget(bytes)?;
        log::info!("cairn: {plan}");
        Ok(())
    })
}

/// Under memory pressure: drop the resident pages of the mapped model file. Nothing is
/// lost; the pages are read again from the file when next needed (slower first tokens).
/// Safe to call at any time from any thread.
#[no_mangle]
pub extern "C" fn cairn_model_release_memory(model: *mut cairn_model) -> cairn_status {
    run(|slot| {
        let m = handles::model(model)?;
        *slot = Some(m.errors.clone());
        m.engine.file.release_pages();
        Ok(())
    })
}

// ---------------------------------------------------------------------------------
// Text

/// Text to tokens. `add_special`: BOS/EOS where the model's metadata asks (raw prompts;
/// not for rendered chat templates, which carry their own). `parse_special`: special
/// token text such as "<|im_start|>" becomes those tokens (never for untrusted text).
/// Writes at most `capacity` tokens; `*n_tokens` receives the count, also when it does
/// not fit (`CAIRN_ERR_BUFFER_TOO_SMALL`, nothing written).
///
/// # Safety
/// `text` points to `text_len` bytes; `tokens` is writable for `capacity` tokens (or
/// NULL with capacity 0); `n_tokens` is writable.
#[no_mangle]
pub unsafe extern "C" fn cairn_tokenize(
    model: *const cairn_model,
    text: *const c_char,
    text_len: usize,
    add_special: bool,
    parse_special: bool,
    tokens: *mut cairn_token,
    capacity: usize,
    n_tokens: *mut usize,
) -> cairn_status {
    run(|slot| {
        let m = handles::model(model)?;
        *slot = Some(m.errors.clone());
        if n_tokens.is_null() {
            return Err(null("n_tokens"));
        }
        if text.is_null() {
            return Err(null("text"));
        }
        // SAFETY: `text_len` readable bytes by the caller's contract.
        let bytes = unsafe { slice(text.cast::<u8>(), text_len, "text")? };
        let text = std::str::from_utf8(bytes).map_err(|e| invalid(format!("text is not UTF-8: {e}")))?;
        let tok = &m.engine.tokenizer;
        let ids =
            if add_special { tok.encode_with_special(text, parse_special)? } else { tok.encode(text, parse_special)? };
        // SAFETY: checked non-null.
        unsafe { n_tokens.write(ids.len()) };
        if ids.len() > capacity {
            return Err(Failure::new(
                CAIRN_ERR_BUFFER_TOO_SMALL,
                format!("{} tokens do not fit in a buffer of {capacity}", ids.len()),
            ));
        }
        if tokens.is_null() && !ids.is_empty() {
            return Err(null("tokens"));
        }
        for (i, id) in ids.iter().enumerate() {
            // SAFETY: `tokens` is writable for `capacity` >= ids.len() tokens.
            unsafe { tokens.add(i).write(*id as cairn_token) };
        }
        Ok(())
    })
}

/// Tokens to text (special tokens as their text; invalid UTF-8 as U+FFFD), NUL-terminated.
///
/// # Safety
/// `tokens` points to `n_tokens` tokens; `buf` is writable for `size` bytes (or NULL
/// with size 0); `out_len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn cairn_detokenize(
    model: *const cairn_model,
    tokens: *const cairn_token,
    n_tokens: usize,
    buf: *mut c_char,
    size: usize,
    out_len: *mut usize,
) -> cairn_status {
    run(|slot| {
        let m = handles::model(model)?;
        *slot = Some(m.errors.clone());
        // SAFETY: caller's contract.
        let tokens = unsafe { slice(tokens, n_tokens, "tokens")? };
        let ids = token_ids(tokens, m.engine.tokenizer.vocab_size())?;
        let text = m.engine.tokenizer.decode(&ids)?;
        // SAFETY: caller's contract.
        unsafe { write_text(text.as_bytes(), buf, size, out_len) }
    })
}

/// The raw bytes of one token (possibly part of a UTF-8 character), NUL-terminated;
/// `*out_len` excludes the NUL.
///
/// # Safety
/// `buf` is writable for `size` bytes (or NULL with size 0); `out_len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn cairn_token_to_piece(
    model: *const cairn_model,
    token: cairn_token,
    buf: *mut c_char,
    size: usize,
    out_len: *mut usize,
) -> cairn_status {
    run(|slot| {
        let m = handles::model(model)?;
        *slot = Some(m.errors.clone());
        let id = token_ids(&[token], m.engine.tokenizer.vocab_size())?[0];
        let piece = m.engine.tokenizer.token_to_piece(id)?;
        // SAFETY: caller's contract.
        unsafe { write_text(piece, buf, size, out_len) }
    })
}

/// Whether `token` ends a generation (EOS, EOT, ...).
///
/// # Safety
/// `out_is_eog` is writable.
#[no_mangle]
pub unsafe extern "C" fn cairn_token_is_eog(
    model: *const cairn_model,
    token: cairn_token,
    out_is_eog: *mut bool,
) -> cairn_status {
    run(|slot| {
        let m = handles::model(model)?;
        *slot = Some(m.errors.clone());
        let id = token_ids(&[token], m.engine.tokenizer.vocab_size())?[0];
        // SAFETY: caller's contract.
        unsafe { put(out_is_eog, m.engine.tokenizer.is_eog(id), "out_is_eog") }
    })
}

/// Render `messages` with the model's chat template (`add_assistant`: end with the
/// opening of the assistant's turn, to generate a reply). Tokenize the result with
/// `add_special = false, parse_special = true`. `CAIRN_ERR_NO_TEMPLATE` when the model
/// has none (a base model): chat in raw completion then.
///
/// # Safety
/// `messages` points to `n_messages` messages whose strings are NUL-terminated; `buf`
/// is writable for `size` bytes (or NULL with size 0); `out_len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn cairn_chat_apply_template(
    model: *const cairn_model,
    messages: *const cairn_chat_message,
    n_messages: usize,
    add_assistant: bool,
    buf: *mut c_char,
    size: usize,
    out_len: *mut usize,
) -> cairn_status {
    run(|slot| {
        let m = handles::model(model)?;
        *slot = Some(m.errors.clone());
        // SAFETY: caller's contract.
        let raw = unsafe { slice(messages, n_messages, "messages")? };
        let mut msgs = Vec::with_capacity(raw.len());
        for (i, msg) in raw.iter().enumerate() {
            // SAFETY: caller's contract.
            let (role, content) = unsafe {
                (
                    c_str(msg.role, &format!("messages[{i}].role"))?,
                    c_str(msg.content, &format!("messages[{i}].content"))?,
                )
            };
            msgs.push(Message::new(role, content));
        }
        let template = m
            .engine
            .template
            .as_ref()
            .map_err(|why| Failure::new(CAIRN_ERR_NO_TEMPLATE, format!("no chat template: {why}")))?;
        let text = template.render(&msgs, add_assistant).map_err(|e| Failure::new(CAIRN_ERR_TEXT, e.to_string()))?;
        // SAFETY: caller's contract.
        unsafe { write_text(text.as_bytes(), buf, size, out_len) }
    })
}

// ---------------------------------------------------------------------------------
// Context

/// Training context length, GemFilter off.
#[no_mangle]
pub extern "C" fn cairn_context_params_default() -> cairn_context_params {
    cairn_context_params { n_ctx: 0, gemfilter: false, gemfilter_top_k: 1024, gemfilter_layer: -1 }
}

/// Create a context (its KV cache is allocated now). `params` may be NULL (defaults).
///
/// # Safety
/// `params` is NULL or valid; `out_ctx` is writable.
#[no_mangle]
pub unsafe extern "C" fn cairn_context_new(
    model: *mut cairn_model,
    params: *const cairn_context_params,
    out_ctx: *mut *mut cairn_context,
) -> cairn_status {
    run(|slot| {
        // SAFETY: caller's contract.
        unsafe { put(out_ctx, std::ptr::null_mut(), "out_ctx")? };
        let m = handles::model(model)?;
        *slot = Some(m.errors.clone());
        // SAFETY: NULL or valid by the caller's contract.
        let params = unsafe { params.as_ref() }.copied().unwrap_or_else(|| cairn_context_params_default());
        if params.gemfilter {
            return Err(Failure::new(CAIRN_ERR_UNSUPPORTED, "GemFilter is not part of this build yet"));
        }
        let train = m.engine.runner.config().context;
        let n_ctx = if params.n_ctx == 0 { train } else { params.n_ctx as usize };
        if n_ctx > train {
            return Err(invalid(format!("n_ctx {n_ctx} exceeds the model's context length {train}")));
        }
        let state = m.engine.new_session(n_ctx)?.into_state();
        let handle = handles::register_context(Context::new(m, n_ctx, state));
        // SAFETY: checked writable above.
        unsafe { out_ctx.write(handle) };
        Ok(())
    })
}

/// Free a context. NULL is a no-op; a second free returns `CAIRN_ERR_INVALID_HANDLE`.
/// If another thread is inside `cairn_generate()` on it, that call finishes first
/// (abort it to make that quick); the memory goes when it returns.
#[no_mangle]
pub extern "C" fn cairn_context_free(ctx: *mut cairn_context) -> cairn_status {
    run(|_| {
        if ctx.is_null() {
            return Ok(());
        }
        handles::free_context(ctx)
    })
}

/// The message of the last failed call on this context, "" if none. Valid until the
/// next failed call on the context or its free.
#[no_mangle]
pub extern "C" fn cairn_context_last_error(ctx: *const cairn_context) -> *const c_char {
    match handles::context(ctx) {
        Ok(c) => c.errors.get(),
        Err(_) => c"not a live context handle".as_ptr(),
    }
}

/// Tokens the context holds at most, and holds now.
///
/// # Safety
/// `out_n_ctx` and `out_n_cached` are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn cairn_context_get_size(
    ctx: *const cairn_context,
    out_n_ctx: *mut usize,
    out_n_cached: *mut usize,
) -> cairn_status {
    run(|slot| {
        let c = handles::context(ctx)?;
        *slot = Some(c.errors.clone());
        let cached = c.with_state(|state| Ok(state.as_ref().map_or(0, |s| s.len())))?;
        if !out_n_ctx.is_null() {
            // SAFETY: non-null, writable by the caller's contract.
            unsafe { out_n_ctx.write(c.n_ctx) };
        }
        if !out_n_cached.is_null() {
            // SAFETY: non-null, writable by the caller's contract.
            unsafe { out_n_cached.write(cached) };
        }
        Ok(())
    })
}

/// Forget the cached tokens and free the KV cache (memory pressure, or a new
/// conversation); the next generation allocates it again.
#[no_mangle]
pub extern "C" fn cairn_context_clear(ctx: *mut cairn_context) -> cairn_status {
    run(|slot| {
        let c = handles::context(ctx)?;
        *slot = Some(c.errors.clone());
        c.with_state(|state| {
            *state = None;
            Ok(())
        })
    })
}

/// Ask the generation running on `ctx` (or the next one, if none runs) to stop after
/// the current token: it returns `CAIRN_OK` with `CAIRN_STOP_ABORTED`. Any thread, any
/// time; the request is consumed by the generation it stops.
#[no_mangle]
pub extern "C" fn cairn_context_abort(ctx: *mut cairn_context) -> cairn_status {
    run(|slot| {
        let c = handles::context(ctx)?;
        *slot = Some(c.errors.clone());
        c.abort.store(true, Ordering::SeqCst);
        Ok(())
    })
}

// ---------------------------------------------------------------------------------
// Generation

/// llama.cpp's defaults: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, no penalties.
#[no_mangle]
pub extern "C" fn cairn_sampler_params_default() -> cairn_sampler_params {
    sampler_params(&SamplerConfig::default())
}

/// Greedy decoding (argmax), no penalties.
#[no_mangle]
pub extern "C" fn cairn_sampler_params_greedy() -> cairn_sampler_params {
    sampler_params(&SamplerConfig::greedy())
}

fn sampler_params(c: &SamplerConfig) -> cairn_sampler_params {
    cairn_sampler_params {
        temperature: c.temperature,
        top_k: c.top_k as i32,
        top_p: c.top_p,
        min_p: c.min_p,
        repeat_penalty: c.repeat_penalty,
        repeat_last_n: c.repeat_last_n as i32,
        presence_penalty: c.presence_penalty,
        frequency_penalty: c.frequency_penalty,
        seed: c.seed,
    }
}

fn sampler_config(p: &cairn_sampler_params) -> R<SamplerConfig> {
    let floats = [
        ("temperature", p.temperature),
        ("top_p", p.top_p),
        ("min_p", p.min_p),
        ("repeat_penalty", p.repeat_penalty),
        ("presence_penalty", p.presence_penalty),
        ("frequency_penalty", p.frequency_penalty),
    ];
    if let Some((name, v)) = floats.iter().find(|(_, v)| !v.is_finite()) {
        return Err(invalid(format!("sampler {name} is {v}")));
    }
    let top_p_ok = p.top_p > 0.0 && p.top_p <= 1.0;
    if !top_p_ok || !(0.0..=1.0).contains(&p.min_p) {
        return Err(invalid(format!("sampler top_p {} must be in (0, 1] and min_p {} in [0, 1]", p.top_p, p.min_p)));
    }
    if p.repeat_penalty <= 0.0 {
        return Err(invalid(format!("sampler repeat_penalty {} must be positive", p.repeat_penalty)));
    }
    let top_k = usize::try_from(p.top_k).map_err(|_| invalid(format!("sampler top_k {} is negative", p.top_k)))?;
    let repeat_last_n = usize::try_from(p.repeat_last_n)
        .map_err(|_| invalid(format!("sampler repeat_last_n {} is negative", p.repeat_last_n)))?;
    Ok(SamplerConfig {
        temperature: p.temperature,
        top_k,
        top_p: p.top_p,
        min_p: p.min_p,
        repeat_penalty: p.repeat_penalty,
        repeat_last_n,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        seed: p.seed,
    })
}

/// Evaluate `prompt` (the whole conversation so far: the prefix the context already
/// holds is reused, only the rest is evaluated), then generate up to `max_tokens`
/// tokens, each passed to `callback` (optional) as it is sampled. `sampler` may be NULL
/// (defaults). `out` (optional) says how many tokens came and why it stopped. Stopping
/// by callback, abort, length or a full context returns `CAIRN_OK`; a panicking
/// callback returns `CAIRN_ERR_CALLBACK` (the tokens so far stay in the context).
///
/// # Safety
/// `prompt` points to `n_prompt` tokens; `sampler` and `out` are NULL or valid;
/// `callback` is NULL or callable with `user_data`.
#[no_mangle]
pub unsafe extern "C" fn cairn_generate(
    ctx: *mut cairn_context,
    prompt: *const cairn_token,
    n_prompt: usize,
    max_tokens: usize,
    sampler: *const cairn_sampler_params,
    callback: cairn_token_callback,
    user_data: *mut c_void,
    out: *mut cairn_generation,
) -> cairn_status {
    run(|slot| {
        let c = handles::context(ctx)?;
        *slot = Some(c.errors.clone());
        if !out.is_null() {
            // SAFETY: non-null, writable by the caller's contract.
            unsafe { out.write(cairn_generation::default()) };
        }
        // SAFETY: caller's contract.
        let prompt = unsafe { slice(prompt, n_prompt, "prompt")? };
        if prompt.is_empty() {
            return Err(invalid("the prompt is empty"));
        }
        let ids = token_ids(prompt, c.model.engine.vocab())?;
        // SAFETY: NULL or valid by the caller's contract.
        let params = unsafe { sampler.as_ref() }.copied().unwrap_or_else(|| cairn_sampler_params_default());
        let mut sampler = Sampler::new(sampler_config(&params)?);
        let (result, status) = c.with_state(|state| {
            let engine = &c.model.engine;
            if c.abort.swap(false, Ordering::SeqCst) {
                let result = cairn_generation { stop_reason: CAIRN_STOP_ABORTED, ..Default::default() };
                return Ok((result, CAIRN_OK));
            }
            let mut session = match state.take() {
                Some(s) => engine.resume(s),
                None => engine.new_session(c.n_ctx)?,
            };
            let reused = session.tokens().iter().zip(&ids).take_while(|(a, b)| a == b).count().min(ids.len() - 1);
            let mut reason = None;
            let mut panicked = false;
            let mut piece_buf = Vec::new();
            let generated = session.generate_tokens(&ids, max_tokens, &mut sampler, |id, piece| {
                if c.abort.swap(false, Ordering::SeqCst) {
                    reason = Some(CAIRN_STOP_ABORTED);
                    return ControlFlow::Break(());
                }
                let Some(cb) = callback else { return ControlFlow::Continue(()) };
                piece_buf.clear();
                piece_buf.extend_from_slice(piece.as_bytes());
                piece_buf.push(0);
                let token = id.map_or(-1, |id| id as cairn_token);
                // SAFETY: the caller provided the callback and its user data together; the
                // piece is NUL-terminated and lives until the callback returns.
                let call = || unsafe { cb(token, piece_buf.as_ptr().cast(), piece.len(), user_data) };
                match catch_unwind(AssertUnwindSafe(call)) {
                    Ok(true) => ControlFlow::Continue(()),
                    Ok(false) => {
                        reason.get_or_insert(CAIRN_STOP_CALLBACK);
                        ControlFlow::Break(())
                    }
                    Err(_) => {
                        panicked = true;
                        reason.get_or_insert(CAIRN_STOP_CALLBACK);
                        ControlFlow::Break(())
                    }
                }
            });
            let full = session.tokens().len() >= session.capacity();
            *state = Some(session.into_state());
            let g = generated?;
            let stop_reason = match reason {
                Some(r) => r,
                None if g.stopped => CAIRN_STOP_EOG,
                None if full => CAIRN_STOP_CONTEXT_FULL,
                None => CAIRN_STOP_LENGTH,
            };
            let result = cairn_generation { n_tokens: g.ids.len(), n_prompt_reused: reused, stop_reason };
            Ok((result, if panicked { CAIRN_ERR_CALLBACK } else { CAIRN_OK }))
        })?;
        if !out.is_null() {
            // SAFETY: non-null, writable by the caller's contract.
            unsafe { out.write(result) };
        }
        if status != CAIRN_OK {
            return Err(Failure::new(status, "the token callback panicked; generation stopped"));
        }
        Ok(())
    })
}
