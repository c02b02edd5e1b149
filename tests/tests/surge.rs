//! The DaemonSet's surge update as the kubelet drives it (deploy/kubernetes/daemonset.yaml): the
//! new pod's meshd takes over from the old one on the same node; the old one, run with
//! `--wait-after-handover`, then stays up, accepting nothing, until its pod is deleted
//! (SIGTERM). The kubelet restarts a container that exits, and a restarted old meshd would take
//! the sockets back from the new pod. Without the flag (systemd, by hand) a meshd whose
//! successor serves drains and exits on its own.

use std::time::Duration;

use nix::sys::signal::Signal;
use testhosts::{meshd_bin, require_privileges, vm_rss_kib, Meshd, TestNet, WorkloadSpec};

const WAIT: Duration = Duration::from_secs(30);
const ORDERS: [WorkloadSpec; 1] = [WorkloadSpec {
    name: "orders",
    ports: &[7000],
}];

/// meshd on node 0 with `config` and `--wait-after-handover`, once ready.
fn start_waiting_meshd(net: &TestNet, config: &str) -> Meshd {
    let path = std::env::temp_dir().join(format!("{}-surge-old.yaml", net.id()));
    std::fs::write(&path, config).unwrap();
    let bin = meshd_bin().display().to_string();
    let cfg = path.display().to_string();
    let argv = [
        bin.as_str(),
        "run",
        "--mode=ebpf",
        "--config",
        &cfg,
        "--wait-after-handover",
    ];
    let process = net.host_process(0, &argv).unwrap();
    let mut meshd = Meshd {
        process,
        config: path,
        pin_dir: net.pin_dir().unwrap().join("n0"),
        state_dir: net.state_dir(0),
        netns: format!("{}-n0", net.id()),
    };
    meshd
        .process
        .expect_line_containing("meshd ready", WAIT)
        .unwrap();
    meshd
}

/// The readiness answer on node 0's :15021 (whichever meshd accepts there).
fn ready(net: &TestNet) -> String {
    let script = "import urllib.request as u;\
                  print(u.urlopen('http://127.0.0.1:15021/healthz/ready').status)";
    net.exec(0, &["python3", "-c", script]).unwrap_or_default()
}

#[test]
fn after_a_handover_the_old_meshd_waits_for_sigterm_only_when_asked() {
    require_privileges!();
    let net = TestNet::new(1).unwrap();
    let config = net.meshd_config(0, &ORDERS, "").unwrap();
    let mut old = start_waiting_meshd(&net, &config);

    // The surge pod's meshd (plain flags here, so the default can be shown next).
    let mut new = net.start_meshd_config(0, "ebpf", &config).unwrap();
    let log = new.process.output_so_far().join("\n");
    assert!(log.contains("took_over=true"), "{log}");
    let waiting = old
        .process
        .expect_line_containing("waiting for SIGTERM (--wait-after-handover)", WAIT);
    if let Err(e) = waiting {
        let log = old.process.output_so_far().join("\n");
        panic!("{e:#}\nthe old meshd's log:\n{log}");
    }
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        vm_rss_kib(old.process.pid()) > 0,
        "the old meshd exited after the handover: {}",
        old.process.output_so_far().join("\n")
    );
    assert_eq!(ready(&net).trim(), "200", "the new meshd must serve");

    // The pod is deleted: SIGTERM ends the waiting meshd at once, successfully.
    old.process.signal(Signal::SIGTERM).unwrap();
    let (status, log) = old.process.wait_output(Duration::from_secs(5)).unwrap();
    assert!(status.success(), "{log}");
    assert!(log.contains("shutting down"), "{log}");
    assert_eq!(ready(&net).trim(), "200", "the new meshd still serves");

    // Without the flag: once its own successor serves, meshd drains and exits by itself.
    let _third = net.start_meshd_config(0, "ebpf", &config).unwrap();
    let (status, log) = new.process.wait_output(WAIT).unwrap();
    assert!(status.success(), "{log}");
    assert!(log.contains("meshd stopped; the new meshd serves"), "{log}");
    assert!(!log.contains("waiting for SIGTERM"), "{log}");
}
