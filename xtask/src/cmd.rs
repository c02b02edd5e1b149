//! Running commands and saying what runs.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

pub fn workspace_root() -> PathBuf {
    let xtask_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    xtask_dir
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn command(program: &str) -> Command {
    Command::new(program)
}

/// Runs a command with inherited output; fails with the command line when it fails.
pub fn run(program: &str, args: &[&str]) -> Result<()> {
    let mut c = command(program);
    c.args(args);
    status(c)
}

pub fn status(mut c: Command) -> Result<()> {
    let shown = show(&c);
    println!("xtask: $ {shown}");
    let st = c
        .status()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !st.success() {
        bail!("`{shown}` failed ({st})");
    }
    Ok(())
}

/// Whether a command runs and exits 0, output discarded.
pub fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// stdout of a command that must succeed.
pub fn output(program: &str, args: &[&str]) -> Result<String> {
    let mut c = Command::new(program);
    c.args(args);
    output_of(c)
}

/// stdout of a prepared command that must succeed.
pub fn output_of(mut c: Command) -> Result<String> {
    let shown = show(&c);
    let out = c
        .output()
        .with_context(|| format!("cannot start {shown}"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn show(c: &Command) -> String {
    let mut parts = vec![c.get_program().to_string_lossy().into_owned()];
    parts.extend(c.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}
