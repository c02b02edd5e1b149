//! The command line: `meshd run | doctor | cleanup | ...`.

mod docs;

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

use crate::{
    doctor,
    intercept::{Mode, ModeChoice},
};

pub use docs::{completions, man};

#[derive(Debug, Parser)]
#[command(name = "meshd", version, about = "Node-level transparent mTLS proxy")]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `meshd=debug`.
    #[arg(long, global = true, env = "MESHD_LOG", default_value = "info")]
    pub log: String,
    /// Report these capability checks as missing whatever the probe finds (comma separated
    /// ids from `meshd doctor`), to rehearse a kernel that lacks them.
    #[arg(
        long,
        global = true,
        env = "MESHD_ASSUME_MISSING",
        value_delimiter = ','
    )]
    pub assume_missing: Vec<String>,
    /// Log lines as human-readable text or as one JSON object per line.
    #[arg(
        long,
        global = true,
        env = "MESHD_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy on this node.
    Run {
        /// Interception mode; `auto` picks ebpf when the kernel allows it.
        #[arg(long, value_enum, default_value = "auto")]
        mode: ModeChoice,
        /// Configuration file (YAML).
        #[arg(long)]
        config: PathBuf,
        /// On SIGTERM (or /quitquitquit), how long open connections may take to finish before
        /// meshd closes them and exits, e.g. 30s. Readiness is 503 meanwhile.
        #[arg(long, default_value = "5s", value_parser = crate::config::parse_duration)]
        drain_timeout: std::time::Duration,
        /// After a successor took over (restart without a gap), wait for SIGTERM or SIGINT
        /// instead of exiting, accepting nothing. For supervisors that restart a process that
        /// exits, as the kubelet restarts a DaemonSet pod's container: restarted, the old meshd
        /// would take the sockets back from its successor.
        #[arg(long)]
        wait_after_handover: bool,
    },
    /// Print what a running meshd is doing (mode, readiness, workloads, pods, policies,
    /// certificates), read from its admin API.
    Status {
        /// The admin API's address.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: std::net::SocketAddr,
    },
    /// Probe the kernel capabilities each mode needs and say which mode `auto` would pick.
    Doctor,
    /// Print meshd's version.
    Version,
    /// Print a shell completion script for meshd to stdout, e.g.
    /// `meshd completions bash > /etc/bash_completion.d/meshd`.
    Completions {
        /// The shell to complete meshd's commands and flags in.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print meshd's man page (roff, section 1) to stdout, e.g. `meshd man > meshd.1`.
    Man,
    /// Remove the interception meshd leaves when it stops or dies: programs, links, pinned maps,
    /// rules, reserved ports (uninstall, or after a crash).
    Cleanup {
        /// The pin directory meshd used (`proxy.pin_dir`); default `<bpffs>/meshd`.
        #[arg(long)]
        pin_dir: Option<PathBuf>,
        /// meshd's state directory (`proxy.state_dir`, or `pods.state_dir` with pods): the
        /// reserved ports it recorded, and the pods whose in-pod rules go too. Default /run/meshd.
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// The embedded certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Authorization policy (Istio AuthorizationPolicy documents) offline.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Chain the `meshd-cni` plugin after the node's network plugin (its conflist in
    /// CONF_DIR) and copy the plugin binary into BIN_DIR. Idempotent.
    InstallCni {
        /// The CNI configuration directory holding the node's conflist.
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        /// The CNI plugin binary directory.
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        /// meshd's socket for the plugin (`pods.cni_socket`).
        #[arg(long, default_value = "/run/meshd/cni.sock")]
        socket: PathBuf,
    },
    /// Remove what `install-cni` added (the conflist entry and the plugin binary), nothing else.
    UninstallCni {
        /// The CNI configuration directory holding the node's conflist.
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        /// The CNI plugin binary directory.
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
    },
    /// Show the iptables rule set a configuration produces.
    Iptables {
        /// Print the rules instead of applying them (`meshd run` applies them; printing is
        /// the only action of this command).
        #[arg(long)]
        dry_run: bool,
        /// Configuration file (YAML).
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate policy files or directories as `meshd run` would load them; errors name file,
    /// line and field.
    Check {
        /// Policy files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Print the decision for one connection or request, the policies that apply and the policy
    /// and rule that decided.
    Explain(crate::policy::explain::Question),
}

/// Runs `meshd policy ...`.
pub fn policy(command: PolicyCommand) -> Result<()> {
    use crate::policy::explain;
    match command {
        PolicyCommand::Check { paths } => explain::check(&paths),
        PolicyCommand::Explain(question) => explain::explain(&question),
    }
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a root CA (ECDSA P-256) in DIR; refuses to overwrite one.
    Init {
        /// Directory for root.crt and root.key (created; an existing root is never replaced).
        #[arg(long)]
        dir: PathBuf,
        /// The trust domain of the SPIFFE IDs this root vouches for.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
    /// Create a node intermediate signed by the root in DIR: DIR/NODE.crt and DIR/NODE.key.
    /// The single-node shortcut: it can sign any identity of the trust domain. With several
    /// nodes, run `ca serve` and give each node a `ca node-credential` instead.
    IssueNode {
        /// The node's name (its HBONE identity is .../ns/meshd-system/sa/NODE).
        node: String,
        /// The directory holding the root (`ca init --dir`); NODE.crt and NODE.key go there.
        #[arg(long)]
        dir: PathBuf,
        /// Lifetime, e.g. 720h.
        #[arg(long, default_value = "720h")]
        ttl: String,
    },
    /// Create a node credential signed by the root in DIR: a leaf that cannot sign, naming
    /// the node, which the node's meshd shows the CA service (DIR/NODE-credential.crt|.key).
    NodeCredential {
        /// The node's name (its identity is .../ns/meshd-system/sa/NODE).
        node: String,
        /// The directory holding the root (`ca init --dir`).
        #[arg(long)]
        dir: PathBuf,
        /// The trust domain of the node's identity.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Lifetime, e.g. 8760h.
        #[arg(long, default_value = "8760h")]
        ttl: String,
    },
    /// Import an existing CA into DIR: Istio's plug-in CA layout (--from a directory holding
    /// ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem) or --cert/--key/--root PEM
    /// files. The CA service then signs with it, and meshes sharing the root trust meshd.
    Import {
        /// The CA directory to write (ca.crt, ca.key, root.crt; never overwritten).
        #[arg(long)]
        dir: PathBuf,
        /// A directory in Istio's plug-in CA layout.
        #[arg(long, conflicts_with_all = ["cert", "key", "root"])]
        from: Option<PathBuf>,
        /// The signing certificate (PEM; may be followed by its chain).
        #[arg(long, requires_all = ["key", "root"])]
        cert: Option<PathBuf>,
        /// Its private key (PEM).
        #[arg(long)]
        key: Option<PathBuf>,
        /// The root it chains to (PEM).
        #[arg(long)]
        root: Option<PathBuf>,
        /// The trust domain of the SPIFFE IDs it will sign.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
    /// Run the CA service: sign SVIDs for nodes (authenticated by their node credential) for
    /// the workloads the registry (etcd) places on them, and nothing else.
    Serve(CaServeArgs),
    /// Ask a CA service for an SVID with a node credential (for operators and tests): writes
    /// OUT.crt (chain) and OUT.key.
    Request {
        /// The SPIFFE ID to ask for.
        spiffe_id: String,
        /// The CA service's address.
        #[arg(long)]
        ca: std::net::SocketAddrV4,
        /// The node credential's certificate.
        #[arg(long)]
        cert: PathBuf,
        /// The node credential's key.
        #[arg(long)]
        key: PathBuf,
        /// Roots the CA service's certificate must chain to.
        #[arg(long)]
        bundle: PathBuf,
        /// Path prefix of the files written.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
pub struct CaServeArgs {
    /// The CA directory: root.crt and root.key (from `ca init`).
    #[arg(long)]
    dir: PathBuf,
    /// The trust domain it signs for.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Where to listen.
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: std::net::SocketAddr,
    /// Roots node credentials must chain to (repeat for several; default: the CA's own root).
    /// During a root rotation the new CA keeps trusting the credentials of the old root.
    #[arg(long = "trust")]
    trust: Vec<PathBuf>,
    /// The longest lifetime it signs, e.g. 24h.
    #[arg(long, default_value = "24h")]
    max_ttl: String,
    /// etcd member URLs of the registry (repeat for several).
    #[arg(long = "etcd", required = true)]
    etcd: Vec<String>,
    /// etcd user (read access to the registry prefix is enough).
    #[arg(long)]
    etcd_user: Option<String>,
    /// File holding the etcd user's password.
    #[arg(long)]
    etcd_password_file: Option<PathBuf>,
    /// The registry's key prefix.
    #[arg(long, default_value = "/meshd")]
    etcd_prefix: String,
}

/// Runs `meshd ca ...`.
pub fn ca(command: CaCommand) -> Result<()> {
    match command {
        CaCommand::Init { dir, trust_domain } => {
            crate::identity::SpiffeId::new(&trust_domain, "ns", "sa")?;
            let cert = crate::identity::ca::init(&dir, &trust_domain)?;
            println!("root CA for {trust_domain}: {}", cert.display());
        }
        CaCommand::IssueNode { node, dir, ttl } => {
            let ttl = crate::config::mesh::parse_duration(&ttl).map_err(anyhow::Error::msg)?;
            let (cert, key) = crate::identity::ca::issue_node(&dir, &node, ttl)?;
            println!("node {node}: {} {}", cert.display(), key.display());
        }
        CaCommand::NodeCredential {
            node,
            dir,
            trust_domain,
            ttl,
        } => {
            let ttl = crate::config::mesh::parse_duration(&ttl).map_err(anyhow::Error::msg)?;
            let (cert, key) =
                crate::identity::ca::issue_node_credential(&dir, &node, &trust_domain, ttl)?;
            println!(
                "node {node} credential: {} {}",
                cert.display(),
                key.display()
            );
        }
        CaCommand::Import {
            dir,
            from,
            cert,
            key,
            root,
            trust_domain,
        } => import_ca(&dir, from, cert.zip(key).zip(root), &trust_domain)?,
        CaCommand::Serve(args) => {
            runtime()?.block_on(crate::identity::ca_service::serve(args.settings()?))?
        }
        CaCommand::Request {
            spiffe_id,
            ca,
            cert,
            key,
            bundle,
            out,
        } => runtime()?.block_on(request_svid(&spiffe_id, ca, (&cert, &key), &bundle, &out))?,
    }
    Ok(())
}

/// `meshd ca import`: from Istio's plug-in layout in `from`, or a (cert, key) pair and root.
fn import_ca(
    dir: &std::path::Path,
    from: Option<PathBuf>,
    files: Option<((PathBuf, PathBuf), PathBuf)>,
    trust_domain: &str,
) -> Result<()> {
    use crate::identity::ca;
    match (from, files) {
        (Some(from), _) => {
            let chain = from.join("cert-chain.pem");
            let chain = Some(chain.as_path()).filter(|p| p.exists());
            let file = |name: &str| from.join(name);
            let (cert, key, root) = (
                file("ca-cert.pem"),
                file("ca-key.pem"),
                file("root-cert.pem"),
            );
            ca::import(dir, &cert, &key, &root, chain, trust_domain)?
        }
        (None, Some(((cert, key), root))) => {
            ca::import(dir, &cert, &key, &root, None, trust_domain)?
        }
        _ => bail!("give --from DIR, or --cert, --key and --root"),
    }
    println!(
        "CA imported into {}: the CA service signs with it",
        dir.display()
    );
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

impl CaServeArgs {
    fn settings(self) -> Result<crate::identity::ca_service::Settings> {
        let etcd = crate::registry::etcd::EtcdConfig {
            endpoints: self.etcd,
            prefix: self.etcd_prefix,
            username: self.etcd_user,
            password_file: self.etcd_password_file,
            tls: None,
            lease_ttl: "10s".into(),
            advertise_address: None,
        };
        let etcd = etcd
            .validate()
            .map_err(|e| anyhow::anyhow!("--etcd*: {e}"))?
            .config;
        let root = self.dir.join(crate::identity::ca::ROOT_CERT);
        let (cert, key) = crate::identity::ca::signing_files(&self.dir);
        Ok(crate::identity::ca_service::Settings {
            cert,
            key,
            bundle: if self.trust.is_empty() {
                vec![root]
            } else {
                self.trust
            },
            trust_domain: self.trust_domain,
            listen: self.listen,
            max_ttl: crate::config::mesh::parse_duration(&self.max_ttl)
                .map_err(anyhow::Error::msg)?,
            etcd,
        })
    }
}

/// `meshd ca request`: one SVID from the CA service, written as OUT.crt and OUT.key.
async fn request_svid(
    id: &str,
    ca: std::net::SocketAddrV4,
    credential: (&std::path::Path, &std::path::Path),
    bundle: &std::path::Path,
    out: &std::path::Path,
) -> Result<()> {
    let id: crate::identity::SpiffeId = id.parse()?;
    let td = id.trust_domain.clone();
    let bundle = std::sync::Arc::new(crate::tls::verify::TrustBundle::load(
        &td,
        &[bundle],
        &Default::default(),
    )?);
    let client = crate::identity::ca_client::CaClient::new(ca.into(), credential, bundle, 0)?;
    let svid = client
        .sign(&id, std::time::Duration::from_secs(3600))
        .await?;
    std::fs::write(out.with_extension("crt"), &svid.chain_pem)?;
    let key = out.with_extension("key");
    std::fs::write(&key, &svid.key_pem)?;
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    println!(
        "{id}: serial {} written to {}.crt",
        svid.serial,
        out.display()
    );
    Ok(())
}

/// Runs `meshd doctor`: prints the report; fails when no mode can run.
pub fn doctor(assume_missing: &[String]) -> Result<()> {
    let report = probe(assume_missing)?;
    print!("{}", report.render());
    if let Err(why) = report.auto_mode() {
        bail!("{why}");
    }
    Ok(())
}

fn probe(assume_missing: &[String]) -> Result<doctor::Report> {
    doctor::probe(assume_missing).map_err(anyhow::Error::msg)
}

/// Turns the operator's choice into a mode this kernel can run, or says what is missing.
pub fn resolve_mode(choice: ModeChoice, assume_missing: &[String]) -> Result<Mode> {
    let report = probe(assume_missing)?;
    let mode = match choice {
        ModeChoice::Ebpf => Mode::Ebpf,
        ModeChoice::Iptables => Mode::Iptables,
        ModeChoice::Auto => {
            let mode = report.auto_mode().map_err(anyhow::Error::msg)?;
            let why = match mode {
                Mode::Ebpf => "every eBPF capability is present".to_string(),
                Mode::Iptables => format!("ebpf lacks {}", report.missing_ids(Mode::Ebpf)),
            };
            tracing::info!(%mode, reason = %why, "--mode=auto picked");
            return Ok(mode);
        }
    };
    let missing = report.missing_ids(mode);
    if !missing.is_empty() {
        bail!("--mode={mode} cannot run here: missing {missing} (see `meshd doctor`)");
    }
    Ok(mode)
}

/// `meshd run`: validates the config, picks the mode, then runs the proxy until stopped.
pub fn run(
    choice: ModeChoice,
    config: &std::path::Path,
    assume_missing: &[String],
    stopping: crate::app::Stopping,
) -> Result<()> {
    if !crate::sys::is_root() {
        bail!("meshd run needs root (it attaches eBPF programs or installs iptables rules)");
    }
    let cgroup_root = crate::sys::ensure_cgroup2()?;
    let cfg = crate::config::load(config, &cgroup_root)?;
    let mode = resolve_mode(choice, assume_missing)?;
    let fds = crate::sys::raise_fd_limit()?;
    tracing::info!(%mode, config = %config.display(), open_files = fds, "starting");
    let mut runtime = match cfg.proxy.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    };
    runtime
        .enable_all()
        .build()?
        .block_on(crate::app::run(mode, cfg, stopping))
}

/// `meshd install-cni`: the plugin binary is the `meshd-cni` installed beside meshd.
pub fn install_cni(conf_dir: &Path, bin_dir: &Path, socket: &Path) -> Result<()> {
    let exe = std::env::current_exe()?;
    let plugin = exe.with_file_name(crate::inpod::cni::PLUGIN_TYPE);
    if !plugin.exists() {
        bail!("{} not found beside meshd", plugin.display());
    }
    let list = crate::inpod::cni_install::install(conf_dir, bin_dir, &plugin, socket)?;
    println!(
        "meshd-cni chained in {} (binary in {})",
        list.display(),
        bin_dir.display()
    );
    Ok(())
}

/// `meshd uninstall-cni`.
pub fn uninstall_cni(conf_dir: &Path, bin_dir: &Path) -> Result<()> {
    let removed = crate::inpod::cni_install::uninstall(conf_dir, bin_dir)?;
    println!(
        "meshd-cni {}",
        if removed {
            "removed"
        } else {
            "was not installed"
        }
    );
    Ok(())
}

/// `meshd iptables --dry-run`: the `iptables-restore` input for this configuration.
pub fn iptables_dry_run(config: &std::path::Path, dry_run: bool) -> Result<()> {
    if !dry_run {
        bail!("meshd iptables only prints the rules a configuration produces (--dry-run); `meshd run --mode=iptables` installs them");
    }
    let cgroup_root = crate::sys::ensure_cgroup2()?;
    let cfg = crate::config::load(config, &cgroup_root)?;
    print!("{}", crate::intercept::iptables::rule_spec(&cfg).render());
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every command and every flag says what it is for in `--help`.
    #[test]
    fn every_command_and_flag_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name());
            if cmd.get_about().is_none() && path != " meshd" {
                missing.push(format!("{path}: no about"));
            }
            for arg in cmd.get_arguments() {
                let builtin = ["help", "version"].contains(&arg.get_id().as_str());
                if !builtin && arg.get_help().is_none() {
                    missing.push(format!("{path} {}: no help", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "", &mut missing);
        assert!(missing.is_empty(), "{missing:#?}");
    }
}
