//! `meshd completions SHELL` and `meshd man`: both generated from the clap definition
//! ([`super::Cli`]), so they say what `--help` says and cannot drift from it.

use std::io::{self, Write};

use anyhow::Result;
use clap::{Arg, Command, CommandFactory};
use clap_complete::Shell;
use roff::{bold, roman, Roff};

/// `meshd completions SHELL`: prints the completion script.
pub fn completions(shell: Shell) -> Result<()> {
    print(&completion_script(shell))
}

/// `meshd man`: prints the man page (roff).
pub fn man() -> Result<()> {
    print(&man_page()?)
}

/// Written in one go and any write error returned: a closed pipe (`meshd man | head`) is an
/// error, not a panic.
fn print(bytes: &[u8]) -> Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()?;
    Ok(())
}

/// The completion script for `shell`, for the binary name `meshd`.
pub fn completion_script(shell: Shell) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut super::Cli::command(), "meshd", &mut out);
    out
}

/// Two lines that define `\*(Aq` (a straight apostrophe), which roff writes before every piece
/// it renders.
const APOSTROPHES: &str = ".ie \\n(.g .ds Aq \\(aq\n.el .ds Aq '\n";

/// meshd's man page, section 1, as one page: the synopsis, description and global options,
/// then a COMMANDS section with every subcommand's usage, purpose and flags.
pub fn man_page() -> io::Result<Vec<u8>> {
    let mut cmd = super::Cli::command();
    cmd.build();
    let man = clap_mangen::Man::new(cmd.clone());
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    let mut commands = Roff::new();
    commands.control("SH", ["COMMANDS"]);
    for sub in cmd.get_subcommands() {
        command_section(&mut commands, sub);
    }
    commands.to_writer(&mut out)?;
    man.render_version_section(&mut out)?;
    let page = String::from_utf8(out).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(title_first(&page).into_bytes())
}

/// Each section rendered separately repeats the apostrophe definition ahead of it; the page
/// keeps one copy, after `.TH`, so that it starts with its title as a man page should.
fn title_first(page: &str) -> String {
    let page = page.replace(APOSTROPHES, "");
    let (title, rest) = page.split_once('\n').unwrap_or((&page, ""));
    format!("{title}\n{APOSTROPHES}{rest}")
}

/// One subcommand (and, for a group such as `ca`, each of its own): a subsection named by
/// the full command, its usage, its about text and its own (non-global) arguments.
fn command_section(roff: &mut Roff, cmd: &Command) {
    if cmd.get_name() == "help" || cmd.is_hide_set() {
        return;
    }
    let name = cmd.get_bin_name().unwrap_or(cmd.get_name());
    roff.control("SS", [name]);
    let usage = cmd.clone().render_usage().to_string();
    let usage = usage.strip_prefix("Usage: ").unwrap_or(&usage).trim();
    roff.text([bold(usage)]);
    roff.control("PP", []);
    if let Some(about) = cmd.get_long_about().or_else(|| cmd.get_about()) {
        roff.text([roman(about.to_string())]);
    }
    let own = cmd.get_arguments().filter(|a| is_documented(a));
    for arg in own {
        roff.control("TP", []);
        roff.text([bold(arg.to_string())]);
        roff.text([roman(arg_help(arg))]);
    }
    for sub in cmd.get_subcommands() {
        command_section(roff, sub);
    }
}

/// Arguments of the subcommand itself: global ones are in OPTIONS already, and `--help` is
/// the same everywhere.
fn is_documented(arg: &Arg) -> bool {
    !arg.is_global_set()
        && !arg.is_hide_set()
        && !["help", "version"].contains(&arg.get_id().as_str())
}

/// The flag's help with its default and possible values, as `--help` shows them.
fn arg_help(arg: &Arg) -> String {
    let mut help = arg.get_help().map(ToString::to_string).unwrap_or_default();
    let values: Vec<String> = arg
        .get_possible_values()
        .iter()
        .filter(|v| !v.is_hide_set())
        .map(|v| v.get_name().to_string())
        .collect();
    if !values.is_empty() {
        help.push_str(&format!(" [possible values: {}]", values.join(", ")));
    }
    // A switch's default (`false`) says nothing.
    let takes_value = arg.get_action().takes_values();
    let defaults: Vec<String> = arg
        .get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().into_owned())
        .collect();
    if takes_value && !defaults.is_empty() {
        help.push_str(&format!(" [default: {}]", defaults.join(",")));
    }
    help
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bash_completion_offers_the_subcommands() {
        let script = String::from_utf8(completion_script(Shell::Bash)).unwrap();
        assert!(script.contains("run"), "{script}");
        assert!(script.contains("doctor"), "{script}");
        assert!(script.contains("completions"), "{script}");
    }

    #[test]
    fn every_shell_gets_a_script() {
        for shell in [
            Shell::Bash,
            Shell::Zsh,
            Shell::Fish,
            Shell::Elvish,
            Shell::PowerShell,
        ] {
            let script = completion_script(shell);
            assert!(!script.is_empty(), "{shell}");
            assert!(
                String::from_utf8(script).unwrap().contains("doctor"),
                "{shell}"
            );
        }
    }

    #[test]
    fn man_page_is_roff_for_meshd_and_lists_its_commands() {
        let page = String::from_utf8(man_page().unwrap()).unwrap();
        assert!(page.starts_with(".TH meshd 1"), "{page}");
        assert_eq!(page.matches(APOSTROPHES).count(), 1, "{page}");
        assert!(page.contains("meshd"), "{page}");
        assert!(page.contains(".SH COMMANDS"), "{page}");
        for command in [
            "meshd run",
            "meshd doctor",
            "meshd ca init",
            "meshd policy explain",
        ] {
            assert!(
                page.contains(&format!(".SS \"{command}\"")),
                "{command}: {page}"
            );
        }
        // Global flags are documented in OPTIONS, each command's own flags under it.
        let (options, commands) = page.split_once(".SH COMMANDS").unwrap();
        assert!(options.contains("\\-\\-log\\-format"), "{options}");
        assert!(!commands.contains("\\-\\-log\\-format"), "{commands}");
        assert!(
            commands.contains("\\-\\-trust\\-domain <TRUST_DOMAIN>"),
            "{commands}"
        );
        assert!(!commands.contains("[default: false]"), "{commands}");
    }
}
