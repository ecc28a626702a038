//! Judges a kernel configuration for socklb: what the agent requires (it
//! does not start without) and what it recommends (speed, features).
//!
//! usage: socklb-kernel-check [--built-in] [CONFIG_FILE]
//! Without a file: the running kernel (/proc/config.gz or
//! /boot/config-<release>). Modules (=m) count as present unless
//! --built-in is given (a kernel without module loading, such as Kata's).
//! Exit status: 0 when nothing required is missing, 1 otherwise, 2 when
//! the configuration cannot be read.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(unknown) = args
        .iter()
        .find(|a| a.starts_with('-') && *a != "--built-in")
    {
        eprintln!(
            "socklb-kernel-check: unknown option {unknown:?}\nusage: socklb-kernel-check [--built-in] [CONFIG_FILE]"
        );
        return ExitCode::from(2);
    }
    let built_in = args.iter().any(|a| a == "--built-in");
    let file = args.iter().find(|a| !a.starts_with('-'));
    let source = match file {
        Some(path) => std::fs::read_to_string(path)
            .map(|text| (path.clone(), text))
            .map_err(|err| anyhow::anyhow!("cannot read {path}: {err}")),
        None => socklb_kernel::running_config(),
    };
    let (name, config) = match source {
        Ok(source) => source,
        Err(err) => {
            eprintln!("socklb-kernel-check: {err:#}");
            return ExitCode::from(2);
        }
    };
    let verdict = socklb_kernel::judge(&config, !built_in);
    if verdict.required.is_empty() {
        println!("{name}: has every option socklb-agent requires");
    } else {
        println!(
            "{name} lacks {} option(s) socklb-agent requires (it will not start):",
            verdict.required.len()
        );
        for m in &verdict.required {
            println!("  {m}");
        }
    }
    if verdict.recommended.is_empty() {
        println!("{name}: has every option socklb recommends");
    } else {
        println!(
            "{name} lacks {} recommended option(s) (kernel-config/kata/socklb.conf adds them):",
            verdict.recommended.len()
        );
        for m in &verdict.recommended {
            println!("  {m}");
        }
    }
    if verdict.required.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
