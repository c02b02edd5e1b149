//! The `meshd` command line. Everything it does lives in the library (src/lib.rs).

use clap::Parser;
use meshd::cli::{self, Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(meshd::logbuf::Stderr::start());
    match cli.log_format {
        cli::LogFormat::Json => logs.json().init(),
        cli::LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let result = match cli.command {
        Command::Doctor => cli::doctor(&cli.assume_missing),
        Command::Cleanup { pin_dir, state_dir } => meshd::cleanup::run(pin_dir, state_dir),
        Command::Iptables { config, dry_run } => cli::iptables_dry_run(&config, dry_run),
        Command::Version => {
            println!("meshd {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Ca(command) => cli::ca(command),
        Command::Policy(command) => cli::policy(command),
        Command::InstallCni {
            conf_dir,
            bin_dir,
            socket,
        } => cli::install_cni(&conf_dir, &bin_dir, &socket),
        Command::UninstallCni { conf_dir, bin_dir } => cli::uninstall_cni(&conf_dir, &bin_dir),
        Command::Run { mode, config } => cli::run(mode, &config, &cli.assume_missing),
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
