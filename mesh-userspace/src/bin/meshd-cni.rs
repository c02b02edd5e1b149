//! `meshd-cni`: the CNI plugin that hands each new pod to meshd (see `meshd::inpod::cni`).

use std::io::Read;

use meshd::inpod::cni::{run, Env};

fn main() -> std::process::ExitCode {
    let env = Env::from_process();
    let mut stdin = String::new();
    let conf: serde_json::Value = match std::io::stdin().read_to_string(&mut stdin) {
        Ok(_) => serde_json::from_str(&stdin).unwrap_or(serde_json::Value::Null),
        Err(_) => serde_json::Value::Null,
    };
    let version = conf["cniVersion"].as_str().unwrap_or("1.0.0").to_string();
    match run(&env, &conf) {
        Ok(serde_json::Value::Null) => std::process::ExitCode::SUCCESS,
        Ok(out) => {
            println!("{out}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{}", e.to_json(&version));
            eprintln!("meshd-cni: {}: {}", e.msg, e.details);
            std::process::ExitCode::FAILURE
        }
    }
}
