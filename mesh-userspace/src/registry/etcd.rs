//! The registry's etcd source. Layout under `prefix` (default `/meshd`):
//! - `nodes/<node>/workloads/<address>`: a node's workloads (JSON [`WorkloadRecord`]), written
//!   by that node's meshd under a lease, so they vanish when the node stops renewing it;
//! - `services/<namespace>/<name>`: the mesh's Services (JSON [`ServiceRecord`]), written by the
//!   operator.
//!
//! With etcd authentication each node's user may write only below `nodes/<node>/` and read the
//! rest (`tests/tests/registry.rs` sets the roles up). meshd lists the prefix once, then
//! watches it from the listed revision. When etcd is unreachable meshd keeps serving from what
//! it last knew (`meshd_registry_connected 0`, readiness detail), reconnects with backoff and
//! resumes the watch from the revision it had; only a compacted revision makes it list again.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, PutOptions, TlsOptions,
    WatchOptions,
};
use serde::Deserialize;

use super::{record, Change, Registry};
use crate::{
    config::{parse_duration, Validated},
    identity::SpiffeId,
    metrics::Metrics,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// `http://host:2379` or `https://host:2379`, one per member.
    pub endpoints: Vec<String>,
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// etcd user (with authentication on: this node's user, which may write only its prefix).
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// TLS to etcd: the CA that signed the members' certificates, and a client certificate.
    #[serde(default)]
    pub tls: Option<EtcdTls>,
    /// How long this node's entries outlive it (`10s`).
    #[serde(default = "default_lease")]
    pub lease_ttl: String,
    /// Host workloads (`workloads:`) are registered at this address with their ports.
    #[serde(default)]
    pub advertise_address: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTls {
    pub ca: PathBuf,
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

fn default_prefix() -> String {
    "/meshd".into()
}

fn default_lease() -> String {
    "10s".into()
}

/// The validated settings.
#[derive(Debug, Clone)]
pub struct EtcdSettings {
    pub config: EtcdConfig,
    pub lease_ttl: Duration,
}

impl EtcdConfig {
    pub fn validate(self) -> Result<EtcdSettings, String> {
        if self.endpoints.is_empty() {
            return Err("endpoints: at least one etcd member".into());
        }
        for e in &self.endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(format!(
                    "endpoints: {e:?} must start with http:// or https://"
                ));
            }
        }
        if !self.prefix.starts_with('/') || self.prefix.ends_with('/') || self.prefix.len() < 2 {
            return Err(format!(
                "prefix: {:?} must start with / and not end with /",
                self.prefix
            ));
        }
        if self.username.is_some() != self.password_file.is_some() {
            return Err("username and password_file go together".into());
        }
        let lease_ttl = parse_duration(&self.lease_ttl).map_err(|e| format!("lease_ttl: {e}"))?;
        if lease_ttl < Duration::from_secs(2) {
            return Err("lease_ttl: at least 2s (etcd's lease granularity is a second)".into());
        }
        Ok(EtcdSettings {
            config: self,
            lease_ttl,
        })
    }
}

/// Starts the etcd source when the config has one (`registry.etcd`): this node's host
/// workloads (at `advertise_address`) and pods are published, the shared state mirrored. The
/// task ends when the handle is dropped.
pub fn spawn(
    cfg: &Validated,
    registry: &Arc<Registry>,
    metrics: &Arc<Metrics>,
) -> Option<AbortOnDrop> {
    let (settings, identity) = (cfg.etcd.as_ref()?, cfg.identity.as_ref()?);
    let node = identity.node_id.service_account.clone();
    let host = match settings.config.advertise_address {
        Some(address) => (cfg.workloads.iter())
            .filter_map(|w| {
                let id = SpiffeId::new(&identity.trust_domain, &w.namespace, &w.service_account);
                Some(record::WorkloadRecord {
                    name: w.name.clone(),
                    namespace: w.namespace.clone(),
                    node: node.clone(),
                    address,
                    ports: w.ports.clone(),
                    spiffe_id: id.ok()?,
                    labels: w.labels.clone(),
                })
            })
            .collect(),
        None => Vec::new(),
    };
    let source = Source::new(
        settings.clone(),
        node,
        registry.clone(),
        metrics.clone(),
        host,
    );
    Some(AbortOnDrop(tokio::spawn(run(source))))
}

/// A task that ends with its handle.
pub struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the etcd source for ever: publishes this node's workloads, mirrors the shared ones.
pub async fn run(source: Source) {
    let mut source = source;
    let mut backoff = Duration::from_millis(200);
    loop {
        match source.session().await {
            Ok(()) => backoff = Duration::from_millis(200),
            Err(e) => {
                next_member();
                source.metrics.registry_connected("etcd", false);
                let trouble = format!(
                    "etcd unreachable: serving from revision {}",
                    source.revision
                );
                source.registry.set_trouble(Some(trouble));
                crate::warn_throttled!("registry_etcd", error = %format!("{e:#}"),
                    revision = source.revision,
                    "etcd unreachable: serving from the last known registry state; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

pub struct Source {
    settings: EtcdSettings,
    node: String,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    /// This node's host workloads (at `advertise_address`), published with its pods.
    host: Vec<record::WorkloadRecord>,
    /// The revision the registry reflects (0: nothing listed yet).
    revision: i64,
    /// This node's lease, while etcd still holds it.
    lease: Option<i64>,
}

impl Source {
    pub fn new(
        settings: EtcdSettings,
        node: String,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        host: Vec<record::WorkloadRecord>,
    ) -> Source {
        Source {
            settings,
            node,
            registry,
            metrics,
            host,
            revision: 0,
            lease: None,
        }
    }

    fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.settings.config.prefix)
    }

    /// One connection's life: connect, lease, publish, list or resume, watch. Returns on the
    /// first error (the caller reconnects).
    async fn session(&mut self) -> Result<()> {
        // Subscribed before the first publish, so a workload added meanwhile is published too.
        let mut local = self.registry.watch_local();
        local.borrow_and_update();
        let mut client = connect(&self.settings.config).await?;
        let lease = self.lease(&mut client).await?;
        let (mut keeper, mut keep_alive) = client.lease_keep_alive(lease).await?;
        self.publish(&mut client, lease).await?;
        if self.revision == 0 {
            self.list(&mut client).await?;
        }
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(self.revision + 1);
        let mut watch = client.watch(self.key(""), Some(options)).await?;
        self.metrics.registry_connected("etcd", true);
        self.registry.set_trouble(None);
        tracing::info!(
            revision = self.revision,
            lease,
            "registry: etcd connected and watching"
        );
        let mut tick = tokio::time::interval(self.settings.lease_ttl / 3);
        loop {
            tokio::select! {
                message = watch.message() => {
                    let Some(response) = message? else { bail!("etcd closed the watch") };
                    if response.compact_revision() > 0 || response.canceled() {
                        tracing::info!(compacted = response.compact_revision(), "registry: watch revision gone; listing again");
                        self.revision = 0;
                        bail!("watch canceled ({})", response.cancel_reason());
                    }
                    self.apply(response.events());
                    if let Some(header) = response.header() {
                        self.revision = self.revision.max(header.revision());
                    }
                }
                _ = tick.tick() => {
                    keeper.keep_alive().await?;
                    match keep_alive.message().await? {
                        Some(r) if r.ttl() > 0 => {}
                        _ => {
                            self.lease = None;
                            bail!("lease {lease} expired");
                        }
                    }
                }
                changed = local.changed() => {
                    changed?;
                    self.publish(&mut client, lease).await?;
                }
            }
        }
    }

    /// The lease this node's entries live under: the one it had, if etcd still holds it.
    async fn lease(&mut self, client: &mut Client) -> Result<i64> {
        if let Some(id) = self.lease {
            let alive = client.lease_time_to_live(id, None).await?;
            if alive.ttl() > 0 {
                return Ok(id);
            }
        }
        let ttl = self.settings.lease_ttl.as_secs().max(2) as i64;
        let id = client.lease_grant(ttl, None).await?.id();
        self.lease = Some(id);
        Ok(id)
    }

    /// Writes this node's workloads under its lease and deletes those it no longer has.
    async fn publish(&self, client: &mut Client, lease: i64) -> Result<()> {
        let mut records = self.registry.local_records();
        records.extend(self.host.iter().cloned());
        let mut keys = Vec::new();
        for mut record in records {
            record.node = self.node.clone();
            let key = self.key(&format!(
                "nodes/{}/workloads/{}/{}",
                self.node, record.namespace, record.name
            ));
            let value = serde_json::to_vec(&record)?;
            let options = PutOptions::new().with_lease(lease);
            client
                .put(key.as_bytes(), value, Some(options))
                .await
                .with_context(|| format!("publishing {key}"))?;
            keys.push(key);
        }
        let mine = self.key(&format!("nodes/{}/workloads/", self.node));
        let existing = client
            .get(
                mine.as_bytes(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await?;
        for kv in existing.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            if !keys.contains(&key) {
                client.delete(kv.key(), None).await?;
            }
        }
        Ok(())
    }

    /// Lists everything under the prefix and replaces the registry's shared state with it.
    async fn list(&mut self, client: &mut Client) -> Result<()> {
        let response = client
            .get(self.key(""), Some(GetOptions::new().with_prefix()))
            .await?;
        let listed = (response.kvs().iter())
            .filter_map(|kv| self.parse(kv.key(), Some(kv.value()), kv.mod_revision()))
            .collect();
        self.registry.replace_shared(listed);
        self.revision = response.header().map_or(0, |h| h.revision());
        self.count("listed");
        Ok(())
    }

    fn apply(&self, events: &[etcd_client::Event]) {
        let changes: Vec<Change> = (events.iter())
            .filter_map(|e| {
                let kv = e.kv()?;
                let value = (e.event_type() == EventType::Put).then(|| kv.value());
                self.parse(kv.key(), value, kv.mod_revision())
            })
            .collect();
        if !changes.is_empty() {
            self.registry.apply_shared(changes);
            self.count("applied");
        }
    }

    /// One key and its value (`None`: deleted) as a registry change; a record that is not
    /// believed is counted and logged, and leaves the registry as it was.
    fn parse(&self, key: &[u8], value: Option<&[u8]>, rev: i64) -> Option<Change> {
        let text = String::from_utf8_lossy(key);
        let rest = text.strip_prefix(&self.key(""))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let result = match (parts.as_slice(), value) {
            (["nodes", node, "workloads", _, _], Some(v)) => record::parse_workload(v, node)
                .map(|r| Change::Workload(text.to_string(), Some((r, rev)))),
            (["nodes", _, "workloads", _, _], None) => Ok(Change::Workload(text.to_string(), None)),
            (["services", _, _], Some(v)) => {
                record::parse_service(v).map(|r| Change::Service(text.to_string(), Some(r)))
            }
            (["services", _, _], None) => Ok(Change::Service(text.to_string(), None)),
            (["bundle", _], Some(v)) => {
                record::parse_root(v).map(|pem| Change::Root(text.to_string(), Some(pem)))
            }
            (["bundle", _], None) => Ok(Change::Root(text.to_string(), None)),
            _ => return None,
        };
        result
            .map_err(|why| {
                self.count(why.label());
                crate::warn_throttled!("registry_rejected", key = %text, reason = %why,
                    "registry record not believed: ignored");
            })
            .ok()
    }

    fn count(&self, result: &'static str) {
        self.metrics.registry_update("etcd", result);
        let (workloads, services) = self.registry.shared_counts();
        self.metrics.registry_entries(workloads, services);
    }
}

pub async fn connect(config: &EtcdConfig) -> Result<Client> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
    if let (Some(user), Some(file)) = (&config.username, &config.password_file) {
        let password = std::fs::read_to_string(file)
            .with_context(|| format!("reading the etcd password from {}", file.display()))?;
        options = options.with_user(user, password.trim_end());
    }
    if let Some(tls) = &config.tls {
        options = options.with_tls(tls_options(tls)?);
    }
    // One member at a time, starting after the last one that failed: a client balanced over
    // all members keeps failing while the first one is down (tonic's balancer does not route
    // around a member that refuses connections).
    let n = config.endpoints.len();
    let start = NEXT_MEMBER.load(Ordering::Relaxed);
    let mut last = None;
    for i in 0..n {
        let endpoint = &config.endpoints[(start + i) % n];
        let attempt = async {
            let mut client = Client::connect([endpoint], Some(options.clone())).await?;
            client.status().await?;
            Ok::<_, etcd_client::Error>(client)
        };
        match attempt.await {
            Ok(client) => return Ok(client),
            Err(e) => {
                NEXT_MEMBER.store((start + i + 1) % n, Ordering::Relaxed);
                last = Some(anyhow::Error::from(e).context(format!("etcd member {endpoint}")));
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no etcd endpoint"))).context("connecting to etcd")
}

/// The member the next connection tries first.
static NEXT_MEMBER: AtomicUsize = AtomicUsize::new(0);

/// After a session on a member ends in an error, the next connection starts with another.
fn next_member() {
    NEXT_MEMBER.fetch_add(1, Ordering::Relaxed);
}

fn tls_options(tls: &EtcdTls) -> Result<TlsOptions> {
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let mut options = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            options = options.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        (None, None) => {}
        _ => bail!("registry.etcd.tls: cert and key go together"),
    }
    Ok(options)
}
