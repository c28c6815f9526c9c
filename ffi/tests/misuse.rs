//! Misuse the C ABI cannot see from C: callbacks that unwind (a Rust or C++ callback
//! declared `C-unwind` may panic), a panic while a context is held, and races between
//! threads on one context. The model is the default one, fetched by `cairn pull`.

use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::atomic::{AtomicUsize, Ordering};

use cairn_ffi::*;

fn model() -> *mut cairn_model {
    let path = cairn::pull::resolve_model(None).expect("default model");
    let path = CString::new(path.to_str().expect("UTF-8 path")).expect("no NUL");
    let mut m = std::ptr::null_mut();
    // SAFETY: valid path and out pointer; NULL params means defaults.
    assert_eq!(unsafe { cairn_model_load(path.as_ptr(), std::ptr::null(), &mut m) }, CAIRN_OK);
    m
}

fn context(m: *mut cairn_model, n_ctx: u32) -> *mut cairn_context {
    let mut params = cairn_context_params_default();
    params.n_ctx = n_ctx;
    let mut c = std::ptr::null_mut();
    // SAFETY: valid params and out pointer.
    assert_eq!(unsafe { cairn_context_new(m, &params, &mut c) }, CAIRN_OK);
    c
}

fn last_error() -> String {
    // SAFETY: NUL-terminated, valid until the next failing call on this thread.
    unsafe { CStr::from_ptr(cairn_last_error()) }.to_string_lossy().into_owned()
}

const PROMPT: [cairn_token; 6] = [1604, 3987, 46477, 24, 94, 727];

unsafe extern "C-unwind" fn panicking_token(_: cairn_token, _: *const c_char, _: usize, calls: *mut c_void) -> bool {
    // SAFETY: the test passes a live AtomicUsize.
    let calls = unsafe { &*calls.cast::<AtomicUsize>() };
    if calls.fetch_add(1, Ordering::SeqCst) == 2 {
        panic!("callback panics on its third token");
    }
    true
}

unsafe extern "C-unwind" fn panicking_progress(_: f32, _: *mut c_void) -> bool {
    panic!("progress callback panics");
}

unsafe extern "C-unwind" fn panicking_log(_: cairn_log_level, _: *const c_char, _: *mut c_void) {
    panic!("log callback panics");
}

#[test]
fn a_panicking_token_callback_is_reported_and_the_context_stays_usable() {
    let m = model();
    let c = context(m, 64);
    let calls = AtomicUsize::new(0);
    let sampler = cairn_sampler_params_greedy();
    let mut out = cairn_generation::default();
    // SAFETY: valid prompt, sampler, callback and out pointer.
    let status = unsafe {
        cairn_generate(
            c,
            PROMPT.as_ptr(),
            PROMPT.len(),
            20,
            &sampler,
            Some(panicking_token),
            (&calls as *const AtomicUsize).cast_mut().cast(),
            &mut out,
        )
    };
    assert_eq!(status, CAIRN_ERR_CALLBACK, "{}", last_error());
    assert!(last_error().contains("panicked"), "{}", last_error());
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!((out.n_tokens, out.stop_reason), (3, CAIRN_STOP_CALLBACK));
    // The tokens so far stay cached: the same prompt again reuses all but its last token.
    // SAFETY: as above, no callback.
    let status =
        unsafe { cairn_generate(c, PROMPT.as_ptr(), PROMPT.len(), 2, &sampler, None, std::ptr::null_mut(), &mut out) };
    assert_eq!(status, CAIRN_OK, "{}", last_error());
    assert_eq!((out.n_tokens, out.n_prompt_reused), (2, PROMPT.len() - 1));
    assert_eq!(cairn_context_free(c), CAIRN_OK);
    assert_eq!(cairn_model_free(m), CAIRN_OK);
}

#[test]
fn a_panicking_progress_callback_fails_the_load() {
    let path = cairn::pull::resolve_model(None).expect("default model");
    let path = CString::new(path.to_str().expect("UTF-8 path")).expect("no NUL");
    let mut params = cairn_model_params_default();
    params.progress_callback = Some(panicking_progress);
    let mut m = std::ptr::dangling_mut::<cairn_model>();
    // SAFETY: valid path, params and out pointer.
    let status = unsafe { cairn_model_load(path.as_ptr(), &params, &mut m) };
    assert_eq!(status, CAIRN_ERR_CALLBACK);
    assert!(m.is_null());
}

#[test]
fn a_panicking_log_callback_is_contained() {
    assert_eq!(cairn_set_log_callback(Some(panicking_log), std::ptr::null_mut(), CAIRN_LOG_DEBUG), CAIRN_OK);
    // A failing call logs at debug level: the callback panics inside and nothing escapes.
    assert_eq!(cairn_model_free(16 as *mut cairn_model), CAIRN_ERR_INVALID_HANDLE);
    assert_eq!(cairn_set_log_callback(None, std::ptr::null_mut(), CAIRN_LOG_WARN), CAIRN_OK);
}

#[test]
fn two_threads_on_one_context_get_busy_not_a_data_race() {
    let m = model();
    let c = context(m, 128) as usize;
    // While one thread generates (held in its callback), the other is turned away.
    static GATE: AtomicUsize = AtomicUsize::new(0);
    unsafe extern "C-unwind" fn hold(_: cairn_token, _: *const c_char, _: usize, _: *mut c_void) -> bool {
        GATE.store(1, Ordering::SeqCst);
        while GATE.load(Ordering::SeqCst) != 2 {
            std::thread::yield_now();
        }
        false
    }
    let worker = std::thread::spawn(move || {
        let sampler = cairn_sampler_params_greedy();
        // SAFETY: valid prompt and sampler; the context outlives the thread.
        unsafe {
            cairn_generate(
                c as *mut cairn_context,
                PROMPT.as_ptr(),
                PROMPT.len(),
                8,
                &sampler,
                Some(hold),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        }
    });
    while GATE.load(Ordering::SeqCst) != 1 {
        std::thread::yield_now();
    }
    let sampler = cairn_sampler_params_greedy();
    // SAFETY: as above.
    let busy = unsafe {
        cairn_generate(
            c as *mut cairn_context,
            PROMPT.as_ptr(),
            PROMPT.len(),
            1,
            &sampler,
            None,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    assert_eq!(busy, CAIRN_ERR_BUSY);
    // Freeing it meanwhile is fine: the running call keeps it alive until it returns.
    assert_eq!(cairn_context_free(c as *mut cairn_context), CAIRN_OK);
    GATE.store(2, Ordering::SeqCst);
    assert_eq!(worker.join().expect("worker"), CAIRN_OK);
    assert_eq!(cairn_context_free(c as *mut cairn_context), CAIRN_ERR_INVALID_HANDLE);
    assert_eq!(cairn_model_free(m), CAIRN_OK);
}
