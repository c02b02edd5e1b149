//! Packet capture on a node's link (tcpdump in the hub namespace, on the node's veth), to check
//! that no plaintext application byte crossed the wire. A check that can fail: an empty capture
//! is an error, and tests run the same traffic without the mesh first to see the marker.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use nix::sys::signal::Signal;

use crate::{process::Process, TestNet};

const WAIT: Duration = Duration::from_secs(30);

pub struct Capture {
    tcpdump: Process,
    file: PathBuf,
}

impl Capture {
    /// Starts capturing TCP on `node`'s link; returns once tcpdump listens.
    pub fn start(net: &TestNet, node: usize) -> Result<Capture> {
        let hub = format!("{}-hub", net.id());
        let file = std::env::temp_dir().join(format!("{}-n{node}.pcap", net.id()));
        let iface = format!("vn{node}");
        let path = file.display().to_string();
        let argv = [
            "ip", "netns", "exec", &hub, "tcpdump", "-i", &iface, "-U", "-s", "0", "-w", &path,
            "tcp",
        ];
        let mut tcpdump = net.host_process(node, &argv)?;
        tcpdump.expect_line_containing("listening on", WAIT)?;
        Ok(Capture { tcpdump, file })
    }

    /// Stops the capture; whether `marker` was seen in any packet.
    pub fn saw(mut self, marker: &str) -> Result<bool> {
        // tcpdump writes what it has seen a moment later: wait until the file stops growing.
        let size = |f: &PathBuf| std::fs::metadata(f).map_or(0, |m| m.len());
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = 0;
        while Instant::now() < deadline && (size(&self.file) <= 24 || size(&self.file) != last) {
            last = size(&self.file);
            std::thread::sleep(Duration::from_millis(200));
        }
        self.tcpdump.signal(Signal::SIGINT)?;
        let (_, log) = self.tcpdump.wait_output(WAIT)?;
        let bytes = std::fs::read(&self.file)?;
        let _ = std::fs::remove_file(&self.file);
        ensure!(
            bytes.len() > 24,
            "capture is empty, the check could not fail:\n{log}"
        );
        Ok(bytes.windows(marker.len()).any(|w| w == marker.as_bytes()))
    }
}
