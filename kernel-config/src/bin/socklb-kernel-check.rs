//! Tells which options socklb needs a kernel configuration lacks.
//!
//! usage: socklb-kernel-check [--built-in] [CONFIG_FILE]
//! Without a file: the running kernel (/proc/config.gz or
//! /boot/config-<release>). Modules (=m) count as present unless
//! --built-in is given (a kernel without module loading).

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let built_in = args.iter().any(|a| a == "--built-in");
    let file = args.iter().find(|a| !a.starts_with("--"));
    let source = match file {
        Some(path) => std::fs::read_to_string(path)
            .map(|text| (path.clone(), text))
            .map_err(anyhow::Error::from),
        None => socklb_kernel::running_config(),
    };
    let (name, config) = match source {
        Ok(source) => source,
        Err(err) => {
            eprintln!("socklb-kernel-check: {err:#}");
            return ExitCode::from(2);
        }
    };
    let missing = socklb_kernel::check(&config, !built_in);
    if missing.is_empty() {
        println!("{name}: has every option socklb needs");
        return ExitCode::SUCCESS;
    }
    println!("{name} lacks {} option(s) socklb needs:", missing.len());
    for m in &missing {
        println!("  {m}");
    }
    ExitCode::FAILURE
}
