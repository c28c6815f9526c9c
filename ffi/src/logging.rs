//! Cairn's `log` records, routed to the app's callback (or stderr).

use std::ffi::{c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::RwLock;

use crate::{cairn_log_callback, cairn_log_level, CAIRN_LOG_DEBUG, CAIRN_LOG_ERROR, CAIRN_LOG_INFO, CAIRN_LOG_WARN};

struct Sink {
    callback: cairn_log_callback,
    /// The app's pointer, only ever handed back to its callback.
    user_data: usize,
}

static SINK: RwLock<Sink> = RwLock::new(Sink { callback: None, user_data: 0 });

struct Logger;

static LOGGER: Logger = Logger;

impl log::Log for Logger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            log::Level::Error => CAIRN_LOG_ERROR,
            log::Level::Warn => CAIRN_LOG_WARN,
            log::Level::Info => CAIRN_LOG_INFO,
            log::Level::Debug | log::Level::Trace => CAIRN_LOG_DEBUG,
        };
        let sink = SINK.read().unwrap_or_else(|e| e.into_inner());
        match sink.callback {
            Some(cb) => {
                let msg = CString::new(record.args().to_string().replace('\0', "\\0")).unwrap_or_default();
                // SAFETY: the app registered the callback with this user data; the message
                // lives until the call returns. A panic in the callback is contained.
                let _ = catch_unwind(AssertUnwindSafe(|| unsafe {
                    cb(level, msg.as_ptr(), sink.user_data as *mut c_void)
                }));
            }
            None => eprintln!("cairn: {}", record.args()),
        }
    }

    fn flush(&self) {}
}

pub fn set(callback: cairn_log_callback, user_data: *mut c_void, level: cairn_log_level) {
    // Fails only if the host already installed a `log` logger (a Rust app embedding the
    // library); its logger then keeps receiving the records.
    let _ = log::set_logger(&LOGGER);
    let filter = match (callback, level) {
        (_, 0) => log::LevelFilter::Off,
        (None, _) => log::LevelFilter::Warn,
        (_, CAIRN_LOG_ERROR) => log::LevelFilter::Error,
        (_, CAIRN_LOG_WARN) => log::LevelFilter::Warn,
        (_, CAIRN_LOG_INFO) => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    log::set_max_level(filter);
    *SINK.write().unwrap_or_else(|e| e.into_inner()) = Sink { callback, user_data: user_data as usize };
}
