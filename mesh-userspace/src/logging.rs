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
