//! The test-host harness itself: nodes reach each other, workloads run where they are told, and
//! nothing the harness made outlives it — not after a normal drop, not after a panic.

use std::{panic, time::Duration};

use testhosts::{require_privileges, sibling_binary, Footprint, TestNet};

const READY: Duration = Duration::from_secs(10);

fn tool() -> String {
    sibling_binary("testhosts-tool").display().to_string()
}

#[test]
fn workload_in_one_node_reaches_a_server_in_another() {
    require_privileges!();
    let net = TestNet::new(2).unwrap();
    let tool = tool();
    let mut server = net
        .host_process(1, &[&tool, "echo-server", "0.0.0.0:7000"])
        .unwrap();
    server.expect_line("ready", READY).unwrap();
    let target = format!("{}:7000", net.node(1).addr);
    let mut client = net
        .workload(0, "checkout", &[&tool, "client", &target, "65536", "4"])
        .unwrap();
    let (status, out) = client.wait_output(Duration::from_secs(20)).unwrap();
    assert!(status.success(), "client failed: {out}");
    assert!(out.contains("ok 4 65536"), "{out}");
    assert!(out.contains(&format!("peer {target}")), "{out}");
}

#[test]
fn workload_runs_in_its_own_cgroup_inside_its_node() {
    require_privileges!();
    let net = TestNet::new(1).unwrap();
    let mut wl = net
        .workload(
            0,
            "orders",
            &["sh", "-c", "cat /proc/self/cgroup; ip -4 -o addr show eth0"],
        )
        .unwrap();
    let cgroup_path = wl.cgroup.clone();
    let (status, out) = wl.wait_output(READY).unwrap();
    assert!(status.success());
    let mount = meshd::sys::mount_of("cgroup2").unwrap();
    let relative = cgroup_path.strip_prefix(&mount).unwrap();
    assert!(
        out.contains(&format!("0::/{}", relative.display())),
        "{out}"
    );
    assert!(out.contains(&net.node(0).addr.to_string()), "{out}");
    assert_ne!(wl.cgroup_id, 0);
}

#[test]
fn dropping_the_net_removes_everything_it_made() {
    require_privileges!();
    let net = TestNet::new(2).unwrap();
    net.pin_dir().unwrap();
    let wl = net.workload(0, "sleeper", &["sleep", "600"]).unwrap();
    let _host = net.host_process(1, &["sleep", "600"]).unwrap();
    // Rules inside a node must go with it.
    net.exec(0, &["iptables", "-w", "5", "-t", "nat", "-N", "MESH_PROBE"])
        .unwrap();
    let footprint = net.footprint();
    assert_full(&footprint);
    drop(net);
    assert_eq!(footprint.leftovers(), Vec::<String>::new());
    drop(wl);
}

#[test]
fn a_panic_inside_a_test_still_removes_everything() {
    require_privileges!();
    let seen = std::sync::Mutex::new(None::<Footprint>);
    let result = panic::catch_unwind(panic::AssertUnwindSafe(|| {
        let net = TestNet::new(2).unwrap();
        net.pin_dir().unwrap();
        let _wl = net.workload(1, "doomed", &["sleep", "600"]).unwrap();
        let footprint = net.footprint();
        assert_full(&footprint);
        *seen.lock().unwrap() = Some(footprint);
        panic!("the test fails half-way");
    }));
    assert!(result.is_err());
    let footprint = seen.lock().unwrap().take().unwrap();
    assert_eq!(footprint.leftovers(), Vec::<String>::new());
}

/// The footprint really recorded something, so "no leftovers" means something.
fn assert_full(fp: &Footprint) {
    assert_eq!(fp.netns.len(), 3, "hub + 2 nodes: {fp:?}");
    assert!(fp.cgroups.len() >= 2, "{fp:?}");
    assert!(!fp.pids.is_empty(), "{fp:?}");
    assert!(fp.pin_dir.as_ref().is_some_and(|d| d.exists()), "{fp:?}");
}
