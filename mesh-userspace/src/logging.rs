//! Log set-up: a tracing filter that can be changed while meshd runs (the admin API's
//! `/logging`), text or JSON lines, written through [`crate::logbuf`].

use std::sync::{Mutex, OnceLock};

use tracing_subscriber::{
    fmt, layer::SubscriberExt, reload, util::SubscriberInitExt, EnvFilter, Registry,
};

use crate::cli::LogFormat;

/// The filter in force and how to replace it.
struct Filter {
    handle: reload::Handle<EnvFilter, Registry>,
    spec: Mutex<String>,
}

static FILTER: OnceLock<Filter> = OnceLock::new();

/// Installs the global subscriber. An unparsable `spec` falls back to `info`.
pub fn init(spec: &str, format: LogFormat) {
    let (spec, filter) = match EnvFilter::try_new(spec) {
        Ok(f) => (spec.to_string(), f),
        Err(_) => ("info".to_string(), EnvFilter::new("info")),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let writer = crate::logbuf::Stderr::start();
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry
            .with(fmt::layer().json().with_writer(writer))
            .init(),
        LogFormat::Text => {
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            registry
                .with(fmt::layer().with_ansi(ansi).with_writer(writer))
                .init()
        }
    }
    let spec = Mutex::new(spec);
    let _ = FILTER.set(Filter { handle, spec });
}

/// The filter in force (`-` before [`init`]).
pub fn filter() -> String {
    FILTER.get().map_or("-".into(), |f| {
        f.spec.lock().unwrap_or_else(|p| p.into_inner()).clone()
    })
}

/// Replaces the filter; a spec that does not parse is refused and the old filter stays.
pub fn set_filter(spec: &str) -> Result<(), String> {
    let parsed = EnvFilter::try_new(spec).map_err(|e| format!("invalid filter {spec:?}: {e}"))?;
    let f = FILTER.get().ok_or("logging is not set up")?;
    f.handle.reload(parsed).map_err(|e| e.to_string())?;
    *f.spec.lock().unwrap_or_else(|p| p.into_inner()) = spec.to_string();
    Ok(())
}

/// How often a repeated warning is written.
pub const THROTTLE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Lets a repeated warning through once per [`THROTTLE_EVERY`] per key, counting the ones it
/// held back. One per call site (see [`warn_throttled!`](crate::warn_throttled)); keys are the
/// few reasons a site logs, so the list stays short.
pub struct Throttle {
    seen: Mutex<Vec<(&'static str, std::time::Instant, u64)>>,
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new()
    }
}

impl Throttle {
    pub const fn new() -> Throttle {
        Throttle {
            seen: Mutex::new(Vec::new()),
        }
    }

    /// `Some(held back since the last one written)` when this occurrence is to be written.
    pub fn allow(&self, key: &'static str) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match seen.iter_mut().find(|(k, ..)| *k == key) {
            None => {
                seen.push((key, now, 0));
                Some(0)
            }
            Some((_, at, held)) if now.duration_since(*at) >= THROTTLE_EVERY => {
                let suppressed = std::mem::take(held);
                *at = now;
                Some(suppressed)
            }
            Some((_, _, held)) => {
                *held += 1;
                None
            }
        }
    }
}

/// `tracing::warn!` for warnings that repeat once per connection or request (which a peer can
/// cause at will): written at most once per [`THROTTLE_EVERY`] for this call site and `key`,
/// with `suppressed` = how many were held back since. Counters, not logs, carry the totals.
#[macro_export]
macro_rules! warn_throttled {
    ($key:expr, $($arg:tt)+) => {{
        static THROTTLE: $crate::logging::Throttle = $crate::logging::Throttle::new();
        if let Some(suppressed) = THROTTLE.allow($key) {
            tracing::warn!(suppressed, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_key_is_held_back_and_counted() {
        let t = Throttle::new();
        assert_eq!(t.allow("a"), Some(0));
        assert_eq!(t.allow("a"), None);
        assert_eq!(t.allow("a"), None);
        assert_eq!(t.allow("b"), Some(0), "another key has its own slot");
        let mut seen = t.seen.lock().unwrap();
        seen[0].1 -= THROTTLE_EVERY;
        drop(seen);
        assert_eq!(t.allow("a"), Some(2));
    }
}
