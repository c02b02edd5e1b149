//! Abuse limits at the inbound edge, per caller identity (its SPIFFE principal; its address for
//! plaintext) and per destination workload: concurrent connections, and new connections per
//! second as a token bucket (`connections_per_second` refill, `burst` capacity). A connection
//! over a limit is refused and counted; the refusal is logged once per interval per limit, not
//! once per connection, so a flood cannot flood the log too.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Deserialize;

/// Keys tracked at most per limiter; idle ones are swept first. A caller that would need more
/// (a plaintext flood from many addresses) is refused, not remembered.
const MAX_KEYS: usize = 65_536;
/// Idle keys are swept at most this often.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// One limit as configured; absent fields do not limit.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// Connections open at once.
    #[serde(default)]
    pub max_connections: Option<u32>,
    /// New connections per second, sustained.
    #[serde(default)]
    pub connections_per_second: Option<f64>,
    /// New connections allowed at once above the rate (default: one second's worth).
    #[serde(default)]
    pub burst: Option<f64>,
}

/// `limits:` in the configuration. Both are off unless set.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Per caller identity (SPIFFE principal; source address for plaintext).
    #[serde(default)]
    pub per_source: LimitConfig,
    /// Per destination workload.
    #[serde(default)]
    pub per_workload: LimitConfig,
}

impl LimitConfig {
    pub fn validate(&self) -> Result<(), String> {
        let positive = |v: Option<f64>, name: &str| match v {
            Some(x) if !(x.is_finite() && x > 0.0) => {
                Err(format!("{name}: must be a positive number"))
            }
            _ => Ok(()),
        };
        positive(self.connections_per_second, "connections_per_second")?;
        positive(self.burst, "burst")?;
        if self.max_connections == Some(0) {
            return Err("max_connections: 0 would refuse everything".into());
        }
        Ok(())
    }

    fn is_off(&self) -> bool {
        self.max_connections.is_none() && self.connections_per_second.is_none()
    }
}

struct Bucket {
    active: u32,
    tokens: f64,
    at: Instant,
}

struct State {
    buckets: HashMap<String, Bucket>,
    swept: Instant,
}

/// One limit, applied per key.
pub struct Limiter {
    /// `source` or `workload`: names the metric reasons and log lines.
    scope: &'static str,
    limit: LimitConfig,
    state: Mutex<State>,
}

/// A held connection slot; released on drop.
pub struct Permit {
    limiter: Arc<Limiter>,
    key: String,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut state = self.limiter.lock();
        if let Some(b) = state.buckets.get_mut(&self.key) {
            b.active = b.active.saturating_sub(1);
        }
    }
}

/// Why a connection was refused, as counted: over a limit of `scope`, or (`keys`) one caller too
/// many to track.
fn reason(scope: &'static str, what: &'static str) -> &'static str {
    match (scope, what) {
        (_, "keys") => "too_many_sources",
        ("source", "concurrency") => "source_connection_limit",
        ("source", _) => "source_rate_limit",
        (_, "concurrency") => "workload_connection_limit",
        _ => "workload_rate_limit",
    }
}

impl Limiter {
    /// `None` when the limit is off.
    pub fn new(scope: &'static str, limit: LimitConfig) -> Option<Arc<Limiter>> {
        (!limit.is_off()).then(|| {
            Arc::new(Limiter {
                scope,
                limit,
                state: Mutex::new(State {
                    buckets: HashMap::new(),
                    swept: Instant::now(),
                }),
            })
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn burst(&self) -> f64 {
        let rate = self.limit.connections_per_second.unwrap_or(0.0);
        self.limit.burst.unwrap_or(rate.max(1.0))
    }

    /// Takes a slot for `key`, or says which limit refused it (a reason for metrics).
    pub fn acquire(self: &Arc<Self>, key: &str) -> Result<Permit, &'static str> {
        let now = Instant::now();
        let mut state = self.lock();
        if state.buckets.len() >= MAX_KEYS && !state.buckets.contains_key(key) {
            self.sweep(&mut state, now);
            if state.buckets.len() >= MAX_KEYS {
                return Err(self.refused(key, "keys"));
            }
        }
        let burst = self.burst();
        let bucket = state.buckets.entry(key.to_string()).or_insert(Bucket {
            active: 0,
            tokens: burst,
            at: now,
        });
        if let Some(rate) = self.limit.connections_per_second {
            let refill = now.duration_since(bucket.at).as_secs_f64() * rate;
            bucket.tokens = (bucket.tokens + refill).min(burst);
            bucket.at = now;
        }
        let what = if self
            .limit
            .max_connections
            .is_some_and(|max| bucket.active >= max)
        {
            Some("concurrency")
        } else if self.limit.connections_per_second.is_some() && bucket.tokens < 1.0 {
            Some("rate")
        } else {
            None
        };
        if let Some(what) = what {
            return Err(self.refused(key, what));
        }
        if self.limit.connections_per_second.is_some() {
            bucket.tokens -= 1.0;
        }
        bucket.active += 1;
        if now.duration_since(state.swept) > SWEEP_EVERY {
            self.sweep(&mut state, now);
        }
        Ok(Permit {
            limiter: self.clone(),
            key: key.to_string(),
        })
    }

    /// Forgets keys with nothing open whose bucket has refilled: they hold no information.
    fn sweep(&self, state: &mut State, now: Instant) {
        let burst = self.burst();
        let rate = self.limit.connections_per_second;
        state.buckets.retain(|_, b| {
            let full =
                rate.is_none_or(|r| b.tokens + now.duration_since(b.at).as_secs_f64() * r >= burst);
            b.active > 0 || !full
        });
        state.swept = now;
    }

    /// Why a connection over a limit is refused; logged once per interval per limit
    /// ([`crate::warn_throttled!`]), not once per connection.
    fn refused(&self, key: &str, what: &'static str) -> &'static str {
        let reason = reason(self.scope, what);
        crate::warn_throttled!(reason, limit = reason, key, limits = ?self.limit,
            "connection refused: over the limit");
        reason
    }
}

/// Both limiters of a meshd.
#[derive(Default, Clone)]
pub struct Limits {
    pub source: Option<Arc<Limiter>>,
    pub workload: Option<Arc<Limiter>>,
}

impl Limits {
    pub fn new(config: &LimitsConfig) -> Limits {
        Limits {
            source: Limiter::new("source", config.per_source),
            workload: Limiter::new("workload", config.per_workload),
        }
    }

    /// Slots for one inbound connection from `source` to `workload`.
    pub fn acquire(&self, source: &str, workload: &str) -> Result<Vec<Permit>, &'static str> {
        let mut permits = Vec::new();
        for (limiter, key) in [(&self.source, source), (&self.workload, workload)] {
            if let Some(l) = limiter {
                permits.push(l.acquire(key)?);
            }
        }
        Ok(permits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrency_is_capped_per_key_and_released_on_drop() {
        let l = Limiter::new(
            "source",
            LimitConfig {
                max_connections: Some(2),
                ..Default::default()
            },
        )
        .unwrap();
        let a = l.acquire("x").unwrap();
        let _b = l.acquire("x").unwrap();
        assert_eq!(l.acquire("x").err(), Some("source_connection_limit"));
        let _other = l.acquire("y").unwrap();
        drop(a);
        assert!(l.acquire("x").is_ok());
    }

    #[test]
    fn the_rate_is_a_token_bucket() {
        let limit = LimitConfig {
            connections_per_second: Some(1000.0),
            burst: Some(3.0),
            ..Default::default()
        };
        let l = Limiter::new("workload", limit).unwrap();
        for _ in 0..3 {
            drop(l.acquire("w").unwrap());
        }
        assert_eq!(l.acquire("w").err(), Some("workload_rate_limit"));
        std::thread::sleep(Duration::from_millis(5));
        assert!(l.acquire("w").is_ok(), "refilled at 1000/s");
    }

    #[test]
    fn idle_keys_are_forgotten_and_bad_values_rejected() {
        let l = Limiter::new(
            "source",
            LimitConfig {
                max_connections: Some(1),
                ..Default::default()
            },
        )
        .unwrap();
        for i in 0..10 {
            drop(l.acquire(&format!("k{i}")).unwrap());
        }
        l.sweep(&mut l.lock(), Instant::now());
        assert!(l.lock().buckets.is_empty());
        assert!(Limiter::new("source", LimitConfig::default()).is_none());
        let bad = LimitConfig {
            connections_per_second: Some(-1.0),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }
}
