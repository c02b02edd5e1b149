//! Processes in test nodes. Each is started straight into its cgroup and its node's network
//! namespace (in the child, between fork and exec), so not one instruction of it runs outside
//! them. Its stdout is read line by line on a thread, so tests wait for a readiness line with a
//! deadline instead of sleeping.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

use crate::net::TestNode;

pub struct Process {
    child: Child,
    lines: Receiver<String>,
    /// Every line read so far, stdout and stderr interleaved as they arrived.
    seen: Vec<String>,
    pub cgroup: PathBuf,
    /// cgroup v2 id: the inode number of the cgroup directory (what eBPF programs see).
    pub cgroup_id: u64,
    pub argv: Vec<String>,
}

impl Process {
    /// Starts `argv` in `cgroup` and `node`'s network namespace (for namespaces a test makes
    /// itself, e.g. a pod's: any `TestNode` whose `netns` names it).
    pub fn spawn_in(node: &TestNode, cgroup: &Path, argv: &[&str]) -> Result<Process> {
        Process::spawn(node, cgroup, argv)
    }

    pub(crate) fn spawn(node: &TestNode, cgroup: &Path, argv: &[&str]) -> Result<Process> {
        let (program, args) = argv.split_first().ok_or_else(|| anyhow!("empty argv"))?;
        std::fs::create_dir_all(cgroup)
            .with_context(|| format!("create cgroup {}", cgroup.display()))?;
        let netns = File::open(node.netns_path())
            .with_context(|| format!("open {}", node.netns_path().display()))?;
        let procs = OpenOptions::new()
            .write(true)
            .open(cgroup.join("cgroup.procs"))
            .with_context(|| format!("open {}/cgroup.procs", cgroup.display()))?;
        let (netns_fd, procs_fd) = (netns.as_raw_fd(), procs.as_raw_fd());
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: only async-signal-safe calls (write, setns) on fds opened before the fork.
        unsafe {
            cmd.pre_exec(move || {
                // "0" moves the writing process, i.e. this child, into the cgroup.
                if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("start {argv:?} in {}", node.netns))?;
        let (tx, lines) = mpsc::channel();
        forward_lines(child.stdout.take().expect("piped"), tx.clone());
        forward_lines(child.stderr.take().expect("piped"), tx);
        let cgroup_id = std::os::linux::fs::MetadataExt::st_ino(&std::fs::metadata(cgroup)?);
        Ok(Process {
            child,
            lines,
            cgroup: cgroup.to_path_buf(),
            cgroup_id,
            argv: argv.iter().map(|s| s.to_string()).collect(),
            seen: Vec::new(),
        })
    }

    /// Every line the process has printed so far (stdout and stderr), without waiting.
    pub fn output_so_far(&mut self) -> Vec<String> {
        self.seen.extend(self.lines.try_iter());
        self.seen.clone()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The next stdout line, waiting at most `timeout`.
    pub fn next_line(&mut self, timeout: Duration) -> Result<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => {
                self.seen.push(line.clone());
                Ok(line)
            }
            Err(RecvTimeoutError::Timeout) => {
                bail!("{:?}: no output within {timeout:?}", self.argv)
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.wait()?;
                bail!("{:?} exited ({status}) before printing a line", self.argv)
            }
        }
    }

    /// Waits for a stdout line starting with `prefix`; returns the line.
    pub fn expect_line(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        self.wait_for_line(|l| l.starts_with(prefix), timeout)
    }

    /// Waits for a stdout or stderr line containing `needle`; returns the line.
    pub fn expect_line_containing(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        self.wait_for_line(|l| l.contains(needle), timeout)
    }

    fn wait_for_line(&mut self, want: impl Fn(&str) -> bool, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.next_line(left)?;
            if want(&line) {
                return Ok(line);
            }
        }
    }

    /// Waits for exit (killing it after `timeout`) and returns its status and everything it
    /// printed.
    pub fn wait_output(&mut self, timeout: Duration) -> Result<(ExitStatus, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.seen.extend(self.lines.iter());
                return Ok((status, self.seen.join("\n")));
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("{:?} still running after {timeout:?}: killed", self.argv);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends a signal (SIGTERM for a graceful stop, SIGKILL to simulate a crash).
    /// A process that has already exited is not signalled: its pid may belong to another now.
    pub fn signal(&mut self, signal: nix::sys::signal::Signal) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = nix::unistd::Pid::from_raw(self.pid());
        nix::sys::signal::kill(pid, signal).context("kill")
    }
}

/// Sends each line of `stream` to `tx` from a thread, until EOF.
fn forward_lines(stream: impl std::io::Read + Send + 'static, tx: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
}

impl Drop for Process {
    fn drop(&mut self) {
        // Our own child, by its pid; reaped so no zombie outlives the test.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// VmRSS of a process, in KiB (0 when it is gone).
pub fn vm_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let line = status.lines().find(|l| l.starts_with("VmRSS:"));
    line.and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}
