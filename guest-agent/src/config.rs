//! Agent configuration, merged from (highest first) command-line flags,
//! `SOCKLB_*` environment variables, `socklb.*` keys on the kernel command
//! line, and built-in defaults. Flags and environment arrive already merged
//! by clap in `main` as one [`Settings`]; the kernel command line is another,
//! merged below it; defaults fill the rest.

use std::{net::IpAddr, path::PathBuf};

use anyhow::{Context as _, Result, bail};

use socklb_protocols::{DEFAULT_AGENT_PORT, kata_service_on};

use crate::{
    kernel::DEFAULT_BPFFS_ROOT,
    server::{HOST_CID, ListenAddr},
};

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The cgroup the programs attach to (the guest's root cgroup); `None`:
    /// the root of the cgroup2 mount the kernel module finds or makes.
    pub cgroup: Option<PathBuf>,
    /// The bpffs directory that holds socklb's pins.
    pub bpffs: PathBuf,
    /// A table file to program at start (and again on SIGHUP).
    pub table: Option<PathBuf>,
    pub log_level: slog::Level,
    /// The guest's own addresses shown by getsockname in place of loopback;
    /// empty: the first global address of each family on the guest's
    /// interfaces.
    pub pod_ips: Vec<IpAddr>,
    /// Where the API is served.
    pub listen: ListenAddr,
    /// vsock peers allowed to call the API.
    pub allowed_cids: Vec<u32>,
    /// Keep the kernel's BPF run-time stats on (two clock reads per hook
    /// run) so Stats reports per-hook time.
    pub bpf_stats: bool,
    /// Listening on a vsock port Kata's own guest services use was asked
    /// for explicitly.
    pub allow_kata_port: bool,
    /// Admit vsock peers whose source port is 1024 or above (hybrid vsock,
    /// where the VMM picks the port; see `peers`).
    pub allow_unprivileged_port: bool,
    /// Close TCP connections to removed backends too (UDP ones always are).
    pub close_tcp_of_removed_backends: bool,
}

/// Settings from one source (flags and environment, or the kernel command
/// line); `None` or empty = not given there.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    pub cgroup: Option<PathBuf>,
    pub bpffs: Option<PathBuf>,
    pub table: Option<PathBuf>,
    pub log_level: Option<String>,
    pub pod_ips: Vec<IpAddr>,
    pub listen: Option<String>,
    pub allowed_cids: Vec<u32>,
    pub bpf_stats: Option<bool>,
    pub allow_kata_port: Option<bool>,
    pub allow_unprivileged_port: Option<bool>,
    pub close_tcp_of_removed_backends: Option<bool>,
}

/// The `socklb.<key>=<value>` keys the agent reads from the kernel command
/// line (the help text lists them from here).
pub const CMDLINE_KEYS: [&str; 11] = [
    "cgroup",
    "bpffs",
    "table",
    "log_level",
    "pod_ip",
    "listen",
    "allow_cid",
    "bpf_stats",
    "allow_kata_port",
    "allow_unprivileged_port",
    "close_tcp_of_removed_backends",
];

impl Settings {
    /// The `socklb.*` keys of a kernel command line. Keys of later versions
    /// or other components are not ours to refuse; a bad value of ours is.
    pub fn from_kernel_cmdline(kernel_cmdline: &str) -> Result<Settings> {
        let mut settings = Settings::default();
        for word in kernel_cmdline.split_whitespace() {
            let Some((key, value)) = word.strip_prefix("socklb.").and_then(|w| w.split_once('='))
            else {
                continue;
            };
            let bad =
                |what: &str| format!("kernel command line socklb.{key}: {value:?} is not {what}");
            match key {
                "cgroup" => settings.cgroup = Some(value.into()),
                "bpffs" => settings.bpffs = Some(value.into()),
                "table" => settings.table = Some(value.into()),
                "log_level" => settings.log_level = Some(value.into()),
                "pod_ip" => {
                    for ip in value.split(',') {
                        settings.pod_ips.push(ip.parse().with_context(|| {
                            format!(
                                "kernel command line socklb.pod_ip: {ip:?} is not an IP address"
                            )
                        })?);
                    }
                }
                "listen" => settings.listen = Some(value.into()),
                "allow_cid" => {
                    for cid in value.split(',') {
                        settings.allowed_cids.push(cid.parse().with_context(|| {
                            format!("kernel command line socklb.allow_cid: {cid:?} is not a CID")
                        })?);
                    }
                }
                "bpf_stats" => {
                    settings.bpf_stats = Some(parse_switch(value).context(bad("a switch"))?)
                }
                "allow_kata_port" => {
                    settings.allow_kata_port = Some(parse_switch(value).context(bad("a switch"))?)
                }
                "allow_unprivileged_port" => {
                    settings.allow_unprivileged_port =
                        Some(parse_switch(value).context(bad("a switch"))?)
                }
                "close_tcp_of_removed_backends" => {
                    settings.close_tcp_of_removed_backends =
                        Some(parse_switch(value).context(bad("a switch"))?)
                }
                _ => {}
            }
        }
        Ok(settings)
    }

    /// These settings where given, `lower`'s elsewhere.
    pub fn over(self, lower: Settings) -> Settings {
        fn list<T>(mine: Vec<T>, theirs: Vec<T>) -> Vec<T> {
            if mine.is_empty() { theirs } else { mine }
        }
        Settings {
            cgroup: self.cgroup.or(lower.cgroup),
            bpffs: self.bpffs.or(lower.bpffs),
            table: self.table.or(lower.table),
            log_level: self.log_level.or(lower.log_level),
            pod_ips: list(self.pod_ips, lower.pod_ips),
            listen: self.listen.or(lower.listen),
            allowed_cids: list(self.allowed_cids, lower.allowed_cids),
            bpf_stats: self.bpf_stats.or(lower.bpf_stats),
            allow_kata_port: self.allow_kata_port.or(lower.allow_kata_port),
            allow_unprivileged_port: self
                .allow_unprivileged_port
                .or(lower.allow_unprivileged_port),
            close_tcp_of_removed_backends: self
                .close_tcp_of_removed_backends
                .or(lower.close_tcp_of_removed_backends),
        }
    }
}

pub const DEFAULT_LOG_LEVEL: &str = "info";

impl Config {
    /// `given` (flags and environment) over the `socklb.*` keys of
    /// `kernel_cmdline` over the defaults.
    pub fn resolve(given: Settings, kernel_cmdline: &str) -> Result<Config> {
        let settings = given.over(Settings::from_kernel_cmdline(kernel_cmdline)?);
        let allow_kata_port = settings.allow_kata_port.unwrap_or(false);
        let listen: ListenAddr = settings
            .listen
            .unwrap_or_else(|| format!("vsock://-1:{DEFAULT_AGENT_PORT}"))
            .parse()?;
        if let ListenAddr::Vsock { port } = listen
            && let Some(service) = kata_service_on(port)
            && !allow_kata_port
        {
            bail!(
                "listen address {listen}: vsock port {port} is {service} in a Kata guest; \
                 use another port (socklb's default is {DEFAULT_AGENT_PORT}) or, outside \
                 Kata, pass --allow-kata-port"
            );
        }
        Ok(Config {
            cgroup: settings.cgroup,
            bpffs: settings
                .bpffs
                .unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS_ROOT).join("socklb")),
            table: settings.table,
            log_level: socklb_logging::parse_level(
                settings.log_level.as_deref().unwrap_or(DEFAULT_LOG_LEVEL),
            )
            .map_err(anyhow::Error::msg)?,
            pod_ips: settings.pod_ips,
            listen,
            // The host may always call; more peers only when configured.
            allowed_cids: [vec![HOST_CID], settings.allowed_cids].concat(),
            bpf_stats: settings.bpf_stats.unwrap_or(false),
            allow_kata_port,
            allow_unprivileged_port: settings.allow_unprivileged_port.unwrap_or(false),
            close_tcp_of_removed_backends: settings.close_tcp_of_removed_backends.unwrap_or(false),
        })
    }
}

/// An on/off value; anything else is an error rather than a silent "off".
fn parse_switch(value: &str) -> Result<bool> {
    match value {
        "1" | "true" | "on" | "yes" => Ok(true),
        "0" | "false" | "off" | "no" => Ok(false),
        _ => bail!("on/off values are 1, true, on, yes, 0, false, off, no"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let config = Config::resolve(Settings::default(), "quiet console=ttyS0").unwrap();
        assert_eq!(config.cgroup, None);
        assert_eq!(config.bpffs, PathBuf::from("/sys/fs/bpf/socklb"));
        assert_eq!(config.table, None);
        assert_eq!(config.log_level, slog::Level::Info);
        assert!(config.pod_ips.is_empty());
        assert_eq!(config.listen, ListenAddr::Vsock { port: 1100 });
        assert_eq!(config.allowed_cids, vec![2]);
        assert!(!config.bpf_stats);
        assert!(!config.allow_kata_port);
        assert!(!config.allow_unprivileged_port);
    }

    #[test]
    fn unprivileged_vsock_ports_flag_over_kernel_cmdline() {
        let allowed = |flag: Option<bool>, cmdline: &str| {
            let given = Settings {
                allow_unprivileged_port: flag,
                ..Settings::default()
            };
            Config::resolve(given, cmdline)
                .unwrap()
                .allow_unprivileged_port
        };
        let on = "socklb.allow_unprivileged_port=1";
        assert!(allowed(None, on));
        assert!(!allowed(Some(false), on));
        assert!(allowed(Some(true), ""));
    }

    #[test]
    fn kernel_cmdline_fills_what_flags_leave_out() {
        let given = Settings {
            log_level: Some("debug".into()),
            ..Settings::default()
        };
        let config = Config::resolve(
            given,
            "console=ttyS0 socklb.log_level=error socklb.table=/etc/t.yaml \
             socklb.pod_ip=10.244.0.5,fd00::5 socklb.future_key=1 \
             socklb.listen=vsock://-1:2000 socklb.allow_cid=3 socklb.bpf_stats=1",
        )
        .unwrap();
        assert_eq!(config.listen, ListenAddr::Vsock { port: 2000 });
        assert_eq!(config.allowed_cids, vec![2, 3]);
        assert!(config.bpf_stats);
        assert_eq!(config.log_level, slog::Level::Debug);
        assert_eq!(config.table, Some(PathBuf::from("/etc/t.yaml")));
        assert_eq!(
            config.pod_ips,
            vec![
                "10.244.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
    }

    #[test]
    fn kata_ports_are_refused_unless_allowed() {
        for (port, service) in [(1024, "kata-agent API"), (1025, "log forwarding")] {
            let cmdline = format!("socklb.listen=vsock://-1:{port}");
            let err = Config::resolve(Settings::default(), &cmdline).unwrap_err();
            let text = format!("{err:#}");
            assert!(text.contains(&format!("vsock port {port}")), "{text}");
            assert!(text.contains(service), "{text}");
        }
        let allowed = Config::resolve(
            Settings::default(),
            "socklb.listen=vsock://-1:1026 socklb.allow_kata_port=yes",
        )
        .unwrap();
        assert_eq!(allowed.listen, ListenAddr::Vsock { port: 1026 });
        let by_flag = Settings {
            listen: Some("vsock://-1:1027".into()),
            allow_kata_port: Some(true),
            ..Settings::default()
        };
        assert!(Config::resolve(by_flag, "").is_ok());
        // Unix sockets have no vsock port to clash with.
        let unix = Config::resolve(Settings::default(), "socklb.listen=unix:///run/1025.sock");
        assert!(unix.is_ok());
    }

    #[test]
    fn every_listed_key_is_read() {
        let unset = format!("{:?}", Settings::default());
        for key in CMDLINE_KEYS {
            // A value no key accepts silently: each either takes it or refuses it.
            match Settings::from_kernel_cmdline(&format!("socklb.{key}=x")) {
                Ok(settings) => assert_ne!(format!("{settings:?}"), unset, "{key} was ignored"),
                Err(err) => assert!(err.to_string().contains(key), "{err}"),
            }
        }
    }

    #[test]
    fn switches_are_on_off_or_an_error() {
        assert!(
            Config::resolve(Settings::default(), "socklb.bpf_stats=yes")
                .unwrap()
                .bpf_stats
        );
        assert!(
            !Config::resolve(Settings::default(), "socklb.bpf_stats=off")
                .unwrap()
                .bpf_stats
        );
        let err = Config::resolve(Settings::default(), "socklb.bpf_stats=maybe").unwrap_err();
        assert!(
            err.to_string().contains("socklb.bpf_stats: \"maybe\""),
            "{err}"
        );
    }

    #[test]
    fn bad_values_are_named() {
        let err = Config::resolve(Settings::default(), "socklb.pod_ip=10.0.0.x").unwrap_err();
        assert!(format!("{err:#}").contains("socklb.pod_ip: \"10.0.0.x\""));
        let given = Settings {
            log_level: Some("loud".into()),
            ..Settings::default()
        };
        assert!(
            Config::resolve(given, "")
                .unwrap_err()
                .to_string()
                .contains("\"loud\"")
        );
    }
}
