//! Minimal logging to stderr: one line per event, with a UTC timestamp and a
//! level, in the spirit of etcd's structured log lines. No dependency, no
//! global state beyond the process-wide level.

use std::sync::atomic::{AtomicU8, Ordering};

static LEVEL: AtomicU8 = AtomicU8::new(2);

/// Sends log lines (everything written to stderr) where `--log-outputs`
/// says: stderr stays, stdout or a file (appended to) takes its place.
pub fn redirect(out: &crate::config::LogOutput) -> Result<(), String> {
    use crate::config::LogOutput;
    use std::os::fd::AsRawFd;
    let fd = match out {
        LogOutput::Stderr => return Ok(()),
        LogOutput::Stdout => 1,
        LogOutput::File(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open log output {}: {e}", path.display()))?;
            // The descriptor stays open as the process's stderr.
            let fd = f.as_raw_fd();
            std::mem::forget(f);
            fd
        }
    };
    // SAFETY: dup2 on descriptors this process owns; no Rust object owns 2.
    if unsafe { libc::dup2(fd, 2) } < 0 {
        return Err(format!(
            "redirecting logs: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// 0 = error, 1 = warn, 2 = info, 3 = debug.
pub fn set_level(level: u8) {
    LEVEL.store(level, Ordering::Relaxed);
}

pub fn enabled(level: u8) -> bool {
    level <= LEVEL.load(Ordering::Relaxed)
}

pub fn timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    // Days since epoch to a civil date (Howard Hinnant's algorithm).
    let z = (secs / 86400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if mo <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}.{:06}Z",
        now.subsec_micros()
    )
}

#[macro_export]
macro_rules! log_at {
    ($lvl:expr, $name:expr, $($arg:tt)*) => {
        if $crate::logging::enabled($lvl) {
            eprintln!("{} {} {}", $crate::logging::timestamp(), $name, format_args!($($arg)*));
        }
    };
}
#[macro_export]
macro_rules! error { ($($arg:tt)*) => { $crate::log_at!(0, "ERROR", $($arg)*) }; }
#[macro_export]
macro_rules! warn { ($($arg:tt)*) => { $crate::log_at!(1, "WARN ", $($arg)*) }; }
#[macro_export]
macro_rules! info { ($($arg:tt)*) => { $crate::log_at!(2, "INFO ", $($arg)*) }; }
#[macro_export]
macro_rules! debug { ($($arg:tt)*) => { $crate::log_at!(3, "DEBUG", $($arg)*) }; }
