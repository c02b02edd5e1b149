//! The `meshd` command line. Everything it does lives in the library (src/lib.rs).

use clap::Parser;
use meshd::cli::{self, Cli, Command};

fn main() -> std::process::ExitCode {
    // One malloc arena, set before any thread exists: glibc would give each other thread (the
    // blocking pool that installs interception, the handover and log threads) an arena of its
    // own, ~10 MB of resident memory kept for start-up work. mesh-bench: idle RSS 20.9 -> 11.3
    // MB, 1,000 connections 36.1 -> 26.2 MB. (`proxy.worker_threads` > 1 shares it too.)
    // SAFETY: mallopt only sets an allocator parameter; no other thread runs yet.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let cli = Cli::parse();
    meshd::logging::init(&cli.log, cli.log_format);
    let result = match cli.command {
        Command::Doctor => cli::doctor(&cli.assume_missing),
        Command::Cleanup { pin_dir, state_dir } => meshd::cleanup::run(pin_dir, state_dir),
        Command::Iptables { config, dry_run } => cli::iptables_dry_run(&config, dry_run),
        Command::Version => {
            println!("meshd {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Completions { shell } => cli::completions(shell),
        Command::Man => cli::man(),
        Command::Ca(command) => cli::ca(command),
        Command::Policy(command) => cli::policy(command),
        Command::InstallCni {
            conf_dir,
            bin_dir,
            socket,
        } => cli::install_cni(&conf_dir, &bin_dir, &socket),
        Command::UninstallCni { conf_dir, bin_dir } => cli::uninstall_cni(&conf_dir, &bin_dir),
        Command::Run {
            mode,
            config,
            drain_timeout,
            wait_after_handover,
        } => {
            let stopping = meshd::app::Stopping {
                drain_timeout,
                wait_after_handover,
            };
            cli::run(mode, &config, &cli.assume_missing, stopping)
        }
        Command::Status { admin } => meshd::admin::status::print(admin),
    };
    meshd::logbuf::flush();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshd: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
