//! JNI glue: `ai.cairn.CairnNative`'s native methods, each a thin call into Cairn's C
//! ABI (the `cairn_ffi` functions, linked into this one library). A failed status
//! becomes a `CairnException` with the C ABI's code and message; an exception thrown by
//! a Java callback stops the call and is left pending, so Java sees it rethrown.
//! Handles travel as `long`s: they are the C ABI's checked ids, so a stale one from Java
//! is reported, never dereferenced.

use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use cairn_ffi::*;
use jni::objects::{JClass, JIntArray, JObject, JObjectArray, JString, JThrowable, JValue};
use jni::sys::{jboolean, jfloat, jint, jintArray, jlong, jstring};
use jni::JNIEnv;

/// Marks "a Java exception is now pending" (thrown by us or by a callback).
struct Thrown;

type J<T> = Result<T, Thrown>;

fn throw(env: &mut JNIEnv, status: i32, message: &str) -> Thrown {
    if env.exception_check().unwrap_or(false) {
        return Thrown;
    }
    let built = env.new_string(message).and_then(|msg| {
        env.new_object(
            "ai/cairn/CairnException",
            "(ILjava/lang/String;)V",
            &[JValue::Int(status), JValue::Object(&msg)],
        )
    });
    match built {
        Ok(obj) => {
            let _ = env.throw(JThrowable::from(obj));
        }
        Err(_) => {
            let _ = env.throw_new("java/lang/RuntimeException", message);
        }
    }
    Thrown
}

/// A status from the C ABI: OK, or the pending exception (a callback's own, else a
/// `CairnException` with this thread's last error).
fn check(env: &mut JNIEnv, status: cairn_status) -> J<()> {
    if env.exception_check().unwrap_or(false) {
        return Err(Thrown);
    }
    if status == CAIRN_OK {
        return Ok(());
    }
    // SAFETY: cairn_last_error returns a NUL-terminated string valid until the next
    // failing call on this thread; it is copied at once.
    let message = unsafe { CStr::from_ptr(cairn_last_error()) }.to_string_lossy().into_owned();
    Err(throw(env, status, &message))
}

/// Run a native method's body: a panic becomes an exception, never an abort.
fn guard<T: Default>(env: &mut JNIEnv, body: impl FnOnce(&mut JNIEnv) -> J<T>) -> T {
    match catch_unwind(AssertUnwindSafe(|| body(env))) {
        Ok(Ok(v)) => v,
        Ok(Err(Thrown)) => T::default(),
        Err(_) => {
            throw(env, CAIRN_ERR_INTERNAL, "internal error in the JNI glue");
            T::default()
        }
    }
}

fn jerr(env: &mut JNIEnv, e: jni::errors::Error) -> Thrown {
    throw(env, CAIRN_ERR_INTERNAL, &format!("JNI: {e}"))
}

fn string(env: &mut JNIEnv, s: &JString, what: &str) -> J<String> {
    if s.is_null() {
        return Err(throw(env, CAIRN_ERR_NULL_ARGUMENT, &format!("{what} is null")));
    }
    match env.get_string(s) {
        Ok(v) => Ok(v.into()),
        Err(e) => Err(jerr(env, e)),
    }
}

fn new_string(env: &mut JNIEnv, s: &str) -> J<jstring> {
    match env.new_string(s) {
        Ok(v) => Ok(v.into_raw()),
        Err(e) => Err(jerr(env, e)),
    }
}

fn ints(env: &mut JNIEnv, a: &JIntArray, what: &str) -> J<Vec<i32>> {
    if a.is_null() {
        return Err(throw(env, CAIRN_ERR_NULL_ARGUMENT, &format!("{what} is null")));
    }
    let n = env.get_array_length(a).map_err(|e| jerr(env, e))?;
    let mut v = vec![0; n as usize];
    env.get_int_array_region(a, 0, &mut v).map_err(|e| jerr(env, e))?;
    Ok(v)
}

/// Call a sizing C function twice: once for the length, once into a buffer of that size.
fn text(env: &mut JNIEnv, mut call: impl FnMut(*mut c_char, usize, *mut usize) -> cairn_status) -> J<String> {
    let mut len = 0usize;
    let status = call(std::ptr::null_mut(), 0, &mut len);
    if status != CAIRN_ERR_BUFFER_TOO_SMALL {
        check(env, status)?;
    }
    let mut buf = vec![0u8; len + 1];
    check(env, call(buf.as_mut_ptr().cast(), buf.len(), &mut len))?;
    buf.truncate(len);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn model(h: jlong) -> *mut cairn_model {
    h as usize as *mut cairn_model
}

fn context(h: jlong) -> *mut cairn_context {
    h as usize as *mut cairn_context
}

#[no_mangle]
pub extern "system" fn Java_ai_cairn_CairnNative_version<'l>(mut env: JNIEnv<'l>, _: JClass<'l>) -> jstring {
    // SAFETY: static NUL-terminated string.
    let v = unsafe { CStr::from_ptr(cairn_version()) }.to_string_lossy().into_owned();
    guard(&mut env, |env| new_string(env, &v))
}

#[no_mangle]
pub extern "system" fn Java_ai_cairn_CairnNative_buildInfo<'l>(mut env: JNIEnv<'l>, _: JClass<'l>) -> jstring {
    // SAFETY: static NUL-terminated string.
    let v = unsafe { CStr::from_ptr(cairn_build_info()) }.to_string_lossy().into_owned();
    guard(&mut env, |env| new_string(env, &v))
}

struct JavaCallback<'a, 'e, 'o> {
    env: &'a mut JNIEnv<'e>,
    obj: &'a JObject<'o>,
}

unsafe extern "C-unwind" fn on_progress(progress: f32, user_data: *mut c_void) -> bool {
    // SAFETY: `user_data` is the `JavaCallback` that `modelLoad` passed, alive for the call.
    let cb = unsafe { &mut *user_data.cast::<JavaCallback>() };
    let r = cb.env.call_method(cb.obj, "onProgress", "(F)Z", &[JValue::Float(progress)]);
    // An exception (pending now) cancels; `check` then lets Java see it.
    r.and_then(|v| v.z()).unwrap_or(false)
}

#[no_mangle]
pub extern "system" fn Java_ai_cairn_CairnNative_modelLoad<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    path: JString<'l>,
    n_threads: jint,
    exact: jboolean,
    memory_budget: jlong,
    progress: JObject<'l>,
) -> jlong {
    guard(&mut env, |env| {
        let path = string(env, &path, "path")?;
        let path = std::ffi::CString::new(path)
            .map_err(|_| throw(env, CAIRN_ERR_INVALID_ARGUMENT, "path contains a NUL character"))?;
        let mut params = cairn_model_params_default();
        params.n_threads = n_threads.max(0) as u32;
        params.exact = exact != 0;
        params.memory_budget = memory_budget.max(0) as u64;
        let mut out = std::ptr::null_mut();
        let status = if progress.is_null() {
            // SAFETY: valid path, params and out pointer.
            unsafe { cairn_model_load(path.as_ptr(), &params, &mut out) }
        } else {
            let mut cb = JavaCallback { env: &mut *env, obj: &progress };
            params.progress_callback = Some(on_progress);
            params.progress_user_data = std::ptr::addr_of_mut!(cb).cast();
            // SAFETY: as above; `cb` outlives the call.
            unsafe { cairn_model_load(path.as_ptr(), &params, &mut out) }
        };
        check(env, status)?;
        Ok(out as usize as jlong)
    })
}

#[no_mangle]
pub extern "system" fn Java_ai_cairn_CairnNative_modelFree<'l>(mut env: JNIEnv<'l>, _: JClass<'l>, m: jlong) {
    guard(&mut env, |env| check(env, cairn_model_free(model(m))))
}

#[no_mangle]
pub extern "system" fn Java_ai_cairn_CairnNative_modelDescribe<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    m: jlong,
) -> jstring {
    guard(&mut env, |env| {
        // SAFETY: `buf` has `size` bytes (or is NULL with 0); `len` is writable.
        let s = text(env, |buf, size, len| unsafe { cairn_model_describe(model(m), buf, size, len) })?;
        new_string(env, &s)
    })
}

#[no_mangle]
pub extern "system" fn Java_ai_cairn_CairnNative_modelSetMemoryBudget<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    m: jlong,
    bytes: jlong,
) {
    guard(&mut env, |env| {
        if bytes < 0 {
            return Err(throw(env, CAIRN_ERR_INVALID_ARGUMENT, "a memory budget cannot be negative"));
        }
        check(env, cairn_model_set_memory_budget(model(m), bytes as u64))
    })
}

#[no_mangle]
pub extern "system" fn Java_ai_cairn_CairnNative_modelReleaseMemory<'l>(mut env: JNIEnv<'l>, _: JClass<'l>, m: jlong) {
    guard(&mut env, |env| check(env, cairn_model_release_memory(model(m))))
}

#[no_mangle]
pub extern "system" fn Java_ai_cairn_CairnNative_tokenize<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    m: jlong,
    text_: JString<'l>,
    add_special: jboolean,
    parse_special: jboolean,
) -> jintArray {
    guard(&mut env, |env| {
        let t = string(env, &text_, "text")?;
        let mut ids: Vec<cairn_token> = Vec::new();
        let mut n = 0usize;
        for _ in 0..2 {
            // SAFETY: `t` is `t.len()` bytes; `ids` has room for `ids.len()` tokens.
            let status = unsafe {
                cairn_tokenize(
                    model(m),
                    t.as_ptr().cast(),
                    t.len(),
                    add_special != 0,
                    parse_special != 0,
                    ids.as_mut_ptr(),
                    ids.len(),
                    &mut n,
                )
            };
            if status == CAIRN_ERR_BUFFER_TOO_SMALL && ids.len() < n {
                ids.resize(n, 0);
                continue;
            }
            check(env, status)?;
            break;
        }
        ids.truncate(n);
        let arr = env.new_int_array(ids.len() as i32).map_err(|e| jerr(env, e))?;
        env.set_int_array_region(&arr, 0, &ids).map_err(|e| jerr(env, e))?;
        Ok(arr.into_raw())
    })
}

#[no_mangle]
pub extern "system" fn Java_ai_cairn_CairnNative_detokenize<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    m: jlong,
    tokens: JIntArray<'l>,
) -> jstring {
    guard(&mut env, |env| {
        let ids = ints(env, &tokens, "tokens")?;
        // SAFETY: `ids` holds `ids.len()` tokens; `buf` has `size` bytes (or NULL with 0).
        let s =
            text(env, |buf, size, len| unsafe { cairn_detokenize(model(m), ids.as_ptr(), ids.len(), buf, size, len) })?;
        new_string(env, &s)
    })
}

#[no_mangle]
pub extern "system" fn Java_ai_cairn_CairnNative_applyChatTemplate<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    m: jlong,
    roles: JObjectArray<'l>,
    contents: JObjectArray<'l>,
    add_assistant: jboolean,
) -> jstring {
    guard(&mut env, |env| {
        if roles.is_null() || contents.is_null() {
            return Err(throw(env, CAIRN_ERR_NULL_ARGUMENT, "roles and contents must not be null"));
        }
        let n = env.get_array_length(&roles).map_err(|e| jerr(env, e))?;
        if env.get_array_length(&contents).map_err(|e| jerr(env, e))? != n {
            return Err(throw(env, CAIRN_ERR_INVALID_ARGUMENT, "roles and contents differ in length"));
        }
        let mut owned = Vec::with_capacity(n as usize);
        for i in 0..n {
            let mut pair = Vec::with_capacity(2);
            for arr in [&roles, &contents] {
                let obj = env.get_object_array_element(arr, i).map_err(|e| jerr(env, e))?;
                let s = string(env, &JString::from(obj), &format!("message {i}"))?;
                pair.push(
                    std::ffi::CString::new(s)
                        .map_err(|_| throw(env, CAIRN_ERR_INVALID_ARGUMENT, "a message contains a NUL character"))?,
                );
            }
            owned.push(pair);
        }
        let msgs: Vec<cairn_chat_message> =
            owned.iter().map(|p| cairn_chat_message { role: p[0].as_ptr(), content: p[1].as_ptr() }).collect();
        let add = add_assistant != 0;
        // SAFETY: `msgs` points into `owned`, alive for the call; `buf` has `size` bytes.
        let s = text(env, |buf, size, len| unsafe {
            cairn_chat_apply_template(model(m), msgs.as_ptr(), msgs.len(), add, buf, size, len)
        })?;
        new_string(env, &s)
    })
}

#[no_mangle]
pub extern "system" fn Java_ai_cairn_CairnNative_contextNew<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    m: jlong,
    n_ctx: jint,
) -> jlong {
    guard(&mut env, |env| {
        if n_ctx < 0 {
            return Err(throw(env, CAIRN_ERR_INVALID_ARGUMENT, "nCtx cannot be negative"));
        }
        let mut params = cairn_context_params_default();
        params.n_ctx = n_ctx as u32;
        let mut out = std::ptr::null_mut();
        // SAFETY: valid params and out pointer.
        check(env, unsafe { cairn_context_new(model(m), &params, &mut out) })?;
        Ok(out as usize as jlong)
    })
}

#[no_mangle]
pub extern "system" fn Java_ai_cairn_CairnNative_contextFree<'l>(mut env: JNIEnv<'l>, _: JClass<'l>, c: jlong) {
    guard(&mut env, |env| check(env, cairn_context_free(context(c))))
}

#[no_mangle]
pub extern "system" fn Java_ai_cairn_CairnNative_contextClear<'l>(mut env: JNIEnv<'l>, _: JClass<'l>, c: jlong) {
    guard(&mut env, |env| check(env, cairn_context_clear(context(c))))
}

#[no_mangle]
pub extern "system" fn Java_ai_cairn_CairnNative_contextAbort<'l>(mut env: JNIEnv<'l>, _: JClass<'l>, c: jlong) {
    guard(&mut env, |env| check(env, cairn_context_abort(context(c))))
}

unsafe extern "C-unwind" fn on_token(
    token: cairn_token,
    piece: *const c_char,
    len: usize,
    user_data: *mut c_void,
) -> bool {
    // SAFETY: `user_data` is the `JavaCallback` that `generate` passed, alive for the
    // call; `piece` holds `len` bytes of UTF-8.
    let (cb, bytes) =
        unsafe { (&mut *user_data.cast::<JavaCallback>(), std::slice::from_raw_parts(piece.cast::<u8>(), len)) };
    let Ok(s) = cb.env.new_string(String::from_utf8_lossy(bytes)) else { return false };
    let r = cb.env.call_method(cb.obj, "onToken", "(ILjava/lang/String;)Z", &[JValue::Int(token), JValue::Object(&s)]);
    // One local reference per token would pile up over a long generation.
    let _ = cb.env.delete_local_ref(s);
    r.and_then(|v| v.z()).unwrap_or(false)
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub extern "system" fn Java_ai_cairn_CairnNative_generate<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    c: jlong,
    prompt: JIntArray<'l>,
    max_tokens: jint,
    temperature: jfloat,
    top_k: jint,
    top_p: jfloat,
    min_p: jfloat,
    repeat_penalty: jfloat,
    seed: jlong,
    callback: JObject<'l>,
) -> jint {
    guard(&mut env, |env| {
        let ids = ints(env, &prompt, "prompt")?;
        if max_tokens < 0 {
            return Err(throw(env, CAIRN_ERR_INVALID_ARGUMENT, "maxTokens cannot be negative"));
        }
        let sampler = cairn_sampler_params {
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            seed: seed as u64,
            ..cairn_sampler_params_default()
        };
        let mut out = cairn_generation::default();
        let status = if callback.is_null() {
            // SAFETY: `ids` holds `ids.len()` tokens; sampler and out are valid.
            unsafe {
                cairn_generate(
                    context(c),
                    ids.as_ptr(),
                    ids.len(),
                    max_tokens as usize,
                    &sampler,
                    None,
                    std::ptr::null_mut(),
                    &mut out,
                )
            }
        } else {
            let mut cb = JavaCallback { env: &mut *env, obj: &callback };
            let user_data = std::ptr::addr_of_mut!(cb).cast();
            // SAFETY: as above; `cb` outlives the call.
            unsafe {
                cairn_generate(
                    context(c),
                    ids.as_ptr(),
                    ids.len(),
                    max_tokens as usize,
                    &sampler,
                    Some(on_token),
                    user_data,
                    &mut out,
                )
            }
        };
        check(env, status)?;
        Ok(out.stop_reason)
    })
}
