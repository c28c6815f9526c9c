//! The handle registry and error messages.
//!
//! A handle given to C is an id that was never an address: ids are handed out from a
//! counter and never reused, so a freed handle stays invalid forever, even after the
//! allocator reuses the memory behind it (a registry of addresses could not tell a
//! double free from a free of a new object at the same address).

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, CString};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use cairn::engine::{Engine, SessionState};

use crate::{cairn_context, cairn_model, cairn_status};
use crate::{CAIRN_ERR_BUSY, CAIRN_ERR_INVALID_HANDLE, CAIRN_ERR_NULL_ARGUMENT};

/// A failed call: its status and message.
pub struct Failure {
    pub status: cairn_status,
    pub message: String,
}

impl Failure {
    pub fn new(status: cairn_status, message: impl Into<String>) -> Failure {
        Failure { status, message: message.into() }
    }
}

impl From<cairn::Error> for Failure {
    fn from(e: cairn::Error) -> Failure {
        use cairn::Error as E;
        let status = match &e {
            E::Io { .. } | E::Fetch(_) | E::Energy(_) => crate::CAIRN_ERR_IO,
            E::Format { .. } => crate::CAIRN_ERR_FORMAT,
            E::Model(_) => crate::CAIRN_ERR_MODEL,
            E::Input(_) => crate::CAIRN_ERR_INVALID_ARGUMENT,
            E::Text(_) => crate::CAIRN_ERR_TEXT,
        };
        Failure::new(status, e.to_string())
    }
}

impl From<cairn::tokenizer::TokenizerError> for Failure {
    fn from(e: cairn::tokenizer::TokenizerError) -> Failure {
        Failure::from(cairn::Error::from(e))
    }
}

pub type R<T> = Result<T, Failure>;

fn c_string(message: &str) -> CString {
    CString::new(message.replace('\0', "\\0")).unwrap_or_default()
}

thread_local! {
    static THREAD_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

pub fn set_thread_error(message: &str) {
    THREAD_ERROR.with(|e| *e.borrow_mut() = c_string(message));
}

pub fn thread_error() -> *const c_char {
    // The CString's buffer lives until the next `set_thread_error` on this thread.
    THREAD_ERROR.with(|e| e.borrow().as_ptr())
}

/// The last error of one handle.
#[derive(Default)]
pub struct ErrorSlot(Mutex<CString>);

impl ErrorSlot {
    pub fn set(&self, message: &str) {
        *lock(&self.0) = c_string(message);
    }

    pub fn get(&self) -> *const c_char {
        // Valid until the next `set` or the handle's free, as the header says.
        lock(&self.0).as_ptr()
    }
}

/// A poisoned lock still holds consistent data here (every writer replaces whole
/// values), and a panic must not become a second panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Model {
    pub engine: Engine,
    pub errors: Arc<ErrorSlot>,
    pub description: String,
}

impl Model {
    pub fn new(engine: Engine) -> Model {
        let c = engine.runner.config();
        let description = format!(
            "{} {} layers, {} dim, {} vocab, {} ctx; {:.1} MiB; {}",
            c.arch,
            c.n_layers,
            c.dim,
            engine.tokenizer.vocab_size(),
            c.context,
            engine.file.file_bytes() as f64 / (1 << 20) as f64,
            engine.runner.backend_name()
        );
        Model { engine, errors: Arc::default(), description }
    }
}

pub struct Context {
    pub model: Arc<Model>,
    pub n_ctx: usize,
    /// Outside the state's lock: another thread sets it while a generation holds the lock.
    pub abort: AtomicBool,
    pub errors: Arc<ErrorSlot>,
    /// `None` after `cairn_context_clear` (or a caught panic): recreated when needed.
    state: Mutex<Option<SessionState>>,
}

impl Context {
    pub fn new(model: Arc<Model>, n_ctx: usize, state: SessionState) -> Context {
        Context { model, n_ctx, abort: AtomicBool::new(false), errors: Arc::default(), state: Mutex::new(Some(state)) }
    }

    /// Run `f` on the state, or report `CAIRN_ERR_BUSY` if another thread holds it.
    pub fn with_state<T>(&self, f: impl FnOnce(&mut Option<SessionState>) -> R<T>) -> R<T> {
        let mut guard = match self.state.try_lock() {
            Ok(g) => g,
            Err(TryLockError::WouldBlock) => {
                return Err(Failure::new(CAIRN_ERR_BUSY, "the context is in use by another thread"))
            }
            // A panic interrupted a call: the state may be half-updated, so drop it.
            Err(TryLockError::Poisoned(e)) => {
                let mut g = e.into_inner();
                *g = None;
                self.state.clear_poison();
                g
            }
        };
        f(&mut guard)
    }
}

enum Handle {
    Model(Arc<Model>),
    Context(Arc<Context>),
}

static HANDLES: Mutex<Option<HashMap<usize, Handle>>> = Mutex::new(None);
/// Steps of 16 keep the ids looking like aligned pointers; 0 is never handed out.
static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

fn register(h: Handle) -> usize {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed).wrapping_mul(16);
    lock(&HANDLES).get_or_insert_with(HashMap::new).insert(id, h);
    id
}

pub fn register_model(m: Model) -> *mut cairn_model {
    register(Handle::Model(Arc::new(m))) as *mut cairn_model
}

pub fn register_context(c: Context) -> *mut cairn_context {
    register(Handle::Context(Arc::new(c))) as *mut cairn_context
}

pub fn model(p: *const cairn_model) -> R<Arc<Model>> {
    if p.is_null() {
        return Err(Failure::new(CAIRN_ERR_NULL_ARGUMENT, "model is NULL"));
    }
    match lock(&HANDLES).as_ref().and_then(|h| h.get(&(p as usize))) {
        Some(Handle::Model(m)) => Ok(m.clone()),
        _ => Err(Failure::new(
            CAIRN_ERR_INVALID_HANDLE,
            format!("{p:p} is not a live model handle (freed, or not from cairn_model_load)"),
        )),
    }
}

pub fn context(p: *const cairn_context) -> R<Arc<Context>> {
    if p.is_null() {
        return Err(Failure::new(CAIRN_ERR_NULL_ARGUMENT, "ctx is NULL"));
    }
    match lock(&HANDLES).as_ref().and_then(|h| h.get(&(p as usize))) {
        Some(Handle::Context(c)) => Ok(c.clone()),
        _ => Err(Failure::new(
            CAIRN_ERR_INVALID_HANDLE,
            format!("{p:p} is not a live context handle (freed, or not from cairn_context_new)"),
        )),
    }
}

/// Remove a handle of the expected kind; the value is dropped outside the registry's
/// lock (dropping a model can take a while).
fn remove(id: usize, is_kind: impl Fn(&Handle) -> bool, what: &str) -> R<Handle> {
    let mut guard = lock(&HANDLES);
    let map = guard.get_or_insert_with(HashMap::new);
    match map.remove(&id) {
        Some(h) if is_kind(&h) => Ok(h),
        other => {
            if let Some(h) = other {
                map.insert(id, h);
            }
            Err(Failure::new(
                CAIRN_ERR_INVALID_HANDLE,
                format!("{:p} is not a live {what} handle (already freed?)", id as *const u8),
            ))
        }
    }
}

pub fn free_model(p: *mut cairn_model) -> R<()> {
    drop(remove(p as usize, |h| matches!(h, Handle::Model(_)), "model")?);
    Ok(())
}

pub fn free_context(p: *mut cairn_context) -> R<()> {
    drop(remove(p as usize, |h| matches!(h, Handle::Context(_)), "context")?);
    Ok(())
}

/// (models, contexts) currently registered.
pub fn live() -> (usize, usize) {
    let guard = lock(&HANDLES);
    let Some(map) = guard.as_ref() else { return (0, 0) };
    let models = map.values().filter(|h| matches!(h, Handle::Model(_))).count();
    (models, map.len() - models)
}
