//! Agent configuration. Each option is declared once, as a field of
//! [`Settings`]: its flag, its `SOCKLB_*` environment variable, its help and
//! its parser. Its `socklb.<key>=<value>` key on the kernel command line is
//! the long flag with `_` for `-`, read by the same declaration. Sources
//! merge as [`precedence`] says: clap merges flags and environment in `main`
//! into one [`Settings`]; [`Config::resolve`] lays that over the kernel
//! command line's and fills the rest with defaults.

use std::{net::IpAddr, path::PathBuf};

use anyhow::{Result, bail};
use clap::{Args as _, FromArgMatches as _, error::ContextKind};

use socklb_protocols::{DEFAULT_AGENT_PORT, kata_service_on};

use crate::{
    kernel::DEFAULT_BPFFS_ROOT,
    server::{HOST_CID, ListenAddr},
};

/// The agent's options from one source (flags and environment, or the kernel
/// command line); `None` or empty = not given there. The doc comments are
/// `--help`'s text; on/off options take an optional value (`--bpf-stats=off`).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct Settings {
    /// Cgroup (v2) to attach the programs to [default: the first cgroup2
    /// mount, else cgroup2 mounted at /run/socklb/cgroup]
    #[arg(long, env = "SOCKLB_CGROUP")]
    pub cgroup: Option<PathBuf>,
    /// bpffs directory for socklb's pins [default: /sys/fs/bpf/socklb]
    #[arg(long, env = "SOCKLB_BPFFS")]
    pub bpffs: Option<PathBuf>,
    /// Service table (YAML or JSON) to program at start; without it the
    /// datapath keeps what is already programmed
    #[arg(long, env = "SOCKLB_TABLE")]
    pub table: Option<PathBuf>,
    /// critical, error, warning, info, debug or trace [default: info]
    #[arg(long, env = "SOCKLB_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// The guest's own address(es), shown by getsockname instead of a
    /// loopback address that only a loopback backend caused [default: the
    /// first global address of each family on a non-loopback interface,
    /// followed as it changes]
    #[arg(long = "pod-ip", env = "SOCKLB_POD_IP", value_delimiter = ',')]
    pub pod_ips: Vec<IpAddr>,
    /// API address: vsock://-1:PORT (a guest) or unix:///path
    /// [default: vsock://-1:1100]
    #[arg(long, env = "SOCKLB_LISTEN")]
    pub listen: Option<String>,
    /// Allow --listen on a vsock port Kata's guest services use (1024-1027):
    /// only for guests that run no kata-agent
    #[arg(long, env = "SOCKLB_ALLOW_KATA_PORT", value_name = "on|off", num_args = 0..=1,
          require_equals = true, default_missing_value = "on", value_parser = parse_switch)]
    pub allow_kata_port: Option<bool>,
    /// A vsock peer CID allowed to call the API besides the host (2): 3
    /// and up (another VM); 0, 1, 2, the any-CID value and this guest's
    /// own CID are refused
    #[arg(long = "allow-cid", env = "SOCKLB_ALLOW_CID", value_delimiter = ',')]
    pub allowed_cids: Vec<u32>,
    /// Admit API callers in this guest itself, over vsock loopback (CID
    /// 1): for tests that run socklb-shim inside the guest. Any process
    /// of the guest, a container's too, could then program the agent
    #[arg(long, env = "SOCKLB_ALLOW_LOOPBACK_CALLERS", value_name = "on|off",
          num_args = 0..=1, require_equals = true, default_missing_value = "on",
          value_parser = parse_switch)]
    pub allow_loopback_callers: Option<bool>,
    /// Admit vsock peers from source ports 1024 and above. By default only
    /// a privileged host process (a port below 1024, which only
    /// CAP_NET_BIND_SERVICE may bind on the host) may call over vhost-vsock;
    /// over hybrid vsock (Firecracker, Cloud Hypervisor, vhost-device-vsock)
    /// the VMM picks the port, so such guests need this and rely on the
    /// hybrid vsock socket's file permissions
    #[arg(long, env = "SOCKLB_ALLOW_UNPRIVILEGED_PORT", value_name = "on|off", num_args = 0..=1,
          require_equals = true, default_missing_value = "on", value_parser = parse_switch)]
    pub allow_unprivileged_port: Option<bool>,
    /// When an update removes a backend, close TCP connections to it too.
    /// Connected UDP sockets to it are always closed (the application gets
    /// an error and reconnects to a live backend); TCP is left alone by
    /// default, as kube-proxy leaves established connections
    #[arg(long, env = "SOCKLB_CLOSE_TCP_OF_REMOVED_BACKENDS", value_name = "on|off",
          num_args = 0..=1, require_equals = true, default_missing_value = "on",
          value_parser = parse_switch)]
    pub close_tcp_of_removed_backends: Option<bool>,
    /// Take backends on loopback addresses (127.0.0.0/8, ::1), whose
    /// connections go to a port of the guest itself: for a node-local
    /// proxy. Refused by default, so no table can hand a service's traffic
    /// to a local process
    #[arg(long, env = "SOCKLB_ALLOW_LOOPBACK_BACKENDS", value_name = "on|off",
          num_args = 0..=1, require_equals = true, default_missing_value = "on",
          value_parser = parse_switch)]
    pub allow_loopback_backends: Option<bool>,
    /// Keep BPF run-time stats on, so Stats reports per-hook time (costs two
    /// clock reads per hook run)
    #[arg(long, env = "SOCKLB_BPF_STATS", value_name = "on|off", num_args = 0..=1,
          require_equals = true, default_missing_value = "on", value_parser = parse_switch)]
    pub bpf_stats: Option<bool>,
    /// Decisions each CPU may write per second while a tracer is attached
    /// (`socklb-shim trace`); the rest are counted as dropped
    #[arg(long, env = "SOCKLB_TRACE_RATE", value_parser = clap::value_parser!(u32).range(1..))]
    pub trace_rate: Option<u32>,
}

/// How the sources of [`Settings`] rank, for `--help`; the keys are listed
/// from the declaration.
pub fn precedence() -> String {
    format!(
        "Configuration precedence, highest first: command-line flags, SOCKLB_* environment \
         variables (named beside each flag), socklb.<key>=<value> on the kernel command line \
         (keys: {}), built-in defaults. On/off options take {SWITCH_VALUES} \
         (a bare flag is on).",
        cmdline_keys().join(", ")
    )
}

/// The `socklb.<key>=<value>` keys the agent reads from the kernel command
/// line: each option's long flag with `_` for `-`.
pub fn cmdline_keys() -> Vec<String> {
    kernel_cmdline_parser()
        .get_arguments()
        .filter_map(|arg| arg.get_long())
        .map(|long| long.replace('-', "_"))
        .collect()
}

/// The declaration of [`Settings`] as a parser of `--key=value` words, without
/// the environment (it ranks above the kernel command line, and is read in
/// `main`). A key given twice: the last counts, a list key adds to the list.
fn kernel_cmdline_parser() -> clap::Command {
    Settings::augment_args(clap::Command::new("kernel command line"))
        .no_binary_name(true)
        .disable_help_flag(true)
        .args_override_self(true)
        .mut_args(|arg| arg.env(None))
}

impl Settings {
    /// The `socklb.*` keys of a kernel command line. Keys of later versions
    /// or other components are not ours to refuse; a bad value of ours is.
    pub fn from_kernel_cmdline(kernel_cmdline: &str) -> Result<Settings> {
        let parser = kernel_cmdline_parser();
        let keys = cmdline_keys();
        let mut words = Vec::new();
        for word in kernel_cmdline.split_whitespace() {
            let Some((key, value)) = word.strip_prefix("socklb.").and_then(|w| w.split_once('='))
            else {
                continue;
            };
            if !keys.iter().any(|known| known == key) {
                continue;
            }
            let flag = format!("--{}={value}", key.replace('_', "-"));
            // Each word alone first, so that a bad value is named by its key.
            if let Err(err) = parser.clone().try_get_matches_from([&flag]) {
                let bad = match err.get(ContextKind::InvalidValue) {
                    Some(element) => element.to_string(),
                    None => value.to_string(),
                };
                // The value parser's words, else clap's ("a value is required ...").
                let why = match std::error::Error::source(&err) {
                    Some(source) => source.to_string(),
                    None => err
                        .to_string()
                        .trim()
                        .trim_start_matches("error: ")
                        .to_string(),
                };
                bail!("kernel command line socklb.{key}: {bad:?} is not valid: {why}");
            }
            words.push(flag);
        }
        let matches = parser.try_get_matches_from(words)?;
        Ok(Settings::from_arg_matches(&matches)?)
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
            allow_kata_port: self.allow_kata_port.or(lower.allow_kata_port),
            allowed_cids: list(self.allowed_cids, lower.allowed_cids),
            allow_loopback_callers: self.allow_loopback_callers.or(lower.allow_loopback_callers),
            allow_unprivileged_port: self
                .allow_unprivileged_port
                .or(lower.allow_unprivileged_port),
            close_tcp_of_removed_backends: self
                .close_tcp_of_removed_backends
                .or(lower.close_tcp_of_removed_backends),
            allow_loopback_backends: self
                .allow_loopback_backends
                .or(lower.allow_loopback_backends),
            bpf_stats: self.bpf_stats.or(lower.bpf_stats),
            trace_rate: self.trace_rate.or(lower.trace_rate),
        }
    }
}

/// [`Settings`] resolved: defaults filled in, values parsed and checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// `None`: the root of the cgroup2 mount the kernel module finds or makes.
    pub cgroup: Option<PathBuf>,
    pub bpffs: PathBuf,
    pub table: Option<PathBuf>,
    pub log_level: slog::Level,
    /// Empty: the guest's addresses are followed as they change.
    pub pod_ips: Vec<IpAddr>,
    pub listen: ListenAddr,
    pub allow_kata_port: bool,
    /// The host's CID first, then those given, then vsock loopback's
    /// with `--allow-loopback-callers`.
    pub allowed_cids: Vec<u32>,
    pub allow_unprivileged_port: bool,
    pub close_tcp_of_removed_backends: bool,
    pub allow_loopback_backends: bool,
    pub bpf_stats: bool,
    pub trace_rate: u32,
    /// Kernel command line values left out, each with why: logged as
    /// warnings once the logger exists.
    pub ignored: Vec<String>,
}

pub const DEFAULT_LOG_LEVEL: &str = "info";
/// A tracer's share of a hook's time stays small at this rate: a ring
/// buffer write is some 100 ns, 0.1 ms a second per CPU.
pub const DEFAULT_TRACE_RATE: u32 = 1_000;

impl Config {
    /// `given` (flags and environment) over the `socklb.*` keys of
    /// `kernel_cmdline` over the defaults. `local_cid` reads this guest's
    /// own vsock CID (`server::local_vsock_cid`), asked only when the agent
    /// listens on vsock and other VMs' CIDs are allowed.
    pub fn resolve(
        given: Settings,
        kernel_cmdline: &str,
        local_cid: impl FnOnce() -> Result<u32>,
    ) -> Result<Config> {
        let cids_from_cmdline = given.allowed_cids.is_empty();
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
        // A value refused here was taken before this check existed: on a
        // kernel command line set for every sandbox it is left out with a
        // warning, so an upgrade does not stop every agent (leaving it out
        // admits fewer callers, never more); a flag is refused.
        let mut allowed_cids = Vec::new();
        let mut ignored = Vec::new();
        let mut requested = settings.allowed_cids;
        let own_cid = match listen {
            ListenAddr::Vsock { .. } if !requested.is_empty() => match local_cid() {
                Ok(cid) => Some(cid),
                // Unchecked CIDs could include this guest's own: none.
                Err(err) if cids_from_cmdline => {
                    ignored.push(format!(
                        "kernel command line socklb.allow_cid left out: this guest's own CID \
                         is unknown, so the CIDs cannot be checked against it ({err:#})"
                    ));
                    requested.clear();
                    None
                }
                Err(err) => return Err(err),
            },
            _ => None,
        };
        for cid in requested {
            match refusal(cid, own_cid) {
                None => allowed_cids.push(cid),
                Some(why) if cids_from_cmdline => ignored.push(format!(
                    "kernel command line socklb.allow_cid={cid} left out: CID {cid} {why}"
                )),
                Some(why) => bail!(
                    "--allow-cid {cid}: CID {cid} {why}; name other VMs' CIDs (3 and up, not \
                     this guest's own)"
                ),
            }
        }
        let loopback_cid = settings
            .allow_loopback_callers
            .unwrap_or(false)
            .then_some(libc::VMADDR_CID_LOCAL);
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
            allow_kata_port,
            // The host may always call; more peers only when configured.
            allowed_cids: [vec![HOST_CID], allowed_cids]
                .concat()
                .into_iter()
                .chain(loopback_cid)
                .collect(),
            allow_unprivileged_port: settings.allow_unprivileged_port.unwrap_or(false),
            close_tcp_of_removed_backends: settings.close_tcp_of_removed_backends.unwrap_or(false),
            allow_loopback_backends: settings.allow_loopback_backends.unwrap_or(false),
            bpf_stats: settings.bpf_stats.unwrap_or(false),
            trace_rate: settings.trace_rate.unwrap_or(DEFAULT_TRACE_RATE),
            ignored,
        })
    }
}

/// Why an `--allow-cid` that is no other VM is refused (such a value
/// either admits no one or admits more than was meant); `own` is this
/// guest's CID when known.
fn refusal(cid: u32, own: Option<u32>) -> Option<&'static str> {
    Some(match cid {
        libc::VMADDR_CID_HYPERVISOR => "is the hypervisor's, which never calls the agent",
        libc::VMADDR_CID_LOCAL => {
            "is vsock loopback: any process in this guest, a container's too, could program \
             the agent (a test that runs socklb-shim in the guest passes \
             --allow-loopback-callers)"
        }
        HOST_CID => "is the host's, always allowed",
        libc::VMADDR_CID_ANY => "is the any-CID value (VMADDR_CID_ANY), no caller's",
        // A guest without a guest-to-host transport reads no CID of its
        // own (VMADDR_CID_ANY, refused above).
        cid if Some(cid) == own => {
            "is this guest's own: any process in this guest, a container's too, could \
             program the agent"
        }
        _ => return None,
    })
}

const SWITCH_VALUES: &str = "1, true, on, yes, 0, false, off or no";

/// An on/off value; anything else is an error rather than a silent "off".
fn parse_switch(value: &str) -> Result<bool, String> {
    match value {
        "1" | "true" | "on" | "yes" => Ok(true),
        "0" | "false" | "off" | "no" => Ok(false),
        _ => Err(format!("on/off values are {SWITCH_VALUES}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CID the guest in these tests has.
    const OWN_CID: u32 = 7;

    fn resolve(given: Settings, kernel_cmdline: &str) -> Result<Config> {
        Config::resolve(given, kernel_cmdline, || Ok(OWN_CID))
    }

    #[test]
    fn defaults() {
        let config = resolve(Settings::default(), "quiet console=ttyS0").unwrap();
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
            resolve(given, cmdline).unwrap().allow_unprivileged_port
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
        let config = resolve(
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
    fn allowed_cids_are_other_vms_and_loopback_only_when_asked() {
        for (cid, named) in [
            ("0", "hypervisor"),
            ("1", "--allow-loopback-callers"),
            ("2", "host's, always allowed"),
            ("4294967295", "VMADDR_CID_ANY"),
            ("7", "this guest's own"),
        ] {
            let given = Settings {
                allowed_cids: vec![3, cid.parse().unwrap()],
                ..Settings::default()
            };
            let err = resolve(given, "").unwrap_err().to_string();
            assert!(
                err.contains(&format!("--allow-cid {cid}: CID {cid}")) && err.contains(named),
                "{err}"
            );
        }
        let config = resolve(
            Settings::default(),
            "socklb.allow_cid=3 socklb.allow_loopback_callers=1",
        )
        .unwrap();
        assert_eq!(config.allowed_cids, [2, 3, 1]);
        assert!(config.ignored.is_empty());
    }

    /// Kernel command lines written before these CIDs were refused still
    /// start the agent: the value is left out, and said.
    #[test]
    fn a_refused_cid_on_the_kernel_command_line_is_left_out_and_said() {
        let config = resolve(
            Settings::default(),
            "socklb.allow_cid=3,1 socklb.allow_cid=7",
        )
        .unwrap();
        assert_eq!(config.allowed_cids, [2, 3]);
        assert_eq!(config.ignored.len(), 2, "{:?}", config.ignored);
        assert!(
            config.ignored[0].contains("socklb.allow_cid=1 left out: CID 1 is vsock loopback"),
            "{:?}",
            config.ignored
        );
        assert!(config.ignored[1].contains("CID 7 is this guest's own"));
        // Flags given override the command line's list, and are refused.
        let given = Settings {
            allowed_cids: vec![1],
            ..Settings::default()
        };
        assert!(resolve(given, "socklb.allow_cid=3").is_err());
    }

    #[test]
    fn the_guests_cid_is_read_only_for_a_vsock_listener_with_other_vms() {
        let resolve_unread = |cids: Vec<u32>, listen: &str| {
            let given = Settings {
                allowed_cids: cids,
                listen: Some(listen.into()),
                ..Settings::default()
            };
            Config::resolve(given, "socklb.allow_loopback_callers=1", || {
                panic!("the CID was read")
            })
        };
        assert!(resolve_unread(vec![OWN_CID], "unix:///run/a.sock").is_ok());
        assert!(resolve_unread(vec![], "vsock://-1:1100").is_ok());
        // A guest whose transport gives it no CID of its own refuses none
        // but the fixed ones.
        let given = Settings {
            allowed_cids: vec![3, OWN_CID],
            ..Settings::default()
        };
        let config = Config::resolve(given, "", || Ok(libc::VMADDR_CID_ANY)).unwrap();
        assert_eq!(config.allowed_cids, [2, 3, OWN_CID]);
    }

    /// A guest whose own CID cannot be read still starts from its kernel
    /// command line, admitting the host alone; a flag is refused.
    #[test]
    fn an_unreadable_own_cid_leaves_the_command_lines_cids_out() {
        let unreadable = || Err(anyhow::anyhow!("cannot open /dev/vsock"));
        let config =
            Config::resolve(Settings::default(), "socklb.allow_cid=3", unreadable).unwrap();
        assert_eq!(config.allowed_cids, [2]);
        assert_eq!(config.ignored.len(), 1, "{:?}", config.ignored);
        assert!(
            config.ignored[0].contains("own CID is unknown")
                && config.ignored[0].contains("cannot open /dev/vsock"),
            "{:?}",
            config.ignored
        );
        let given = Settings {
            allowed_cids: vec![3],
            ..Settings::default()
        };
        assert!(Config::resolve(given, "", unreadable).is_err());
    }

    #[test]
    fn kata_ports_are_refused_unless_allowed() {
        for (port, service) in [(1024, "kata-agent API"), (1025, "log forwarding")] {
            let cmdline = format!("socklb.listen=vsock://-1:{port}");
            let err = resolve(Settings::default(), &cmdline).unwrap_err();
            let text = format!("{err:#}");
            assert!(text.contains(&format!("vsock port {port}")), "{text}");
            assert!(text.contains(service), "{text}");
        }
        let allowed = resolve(
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
        assert!(resolve(by_flag, "").is_ok());
        // Unix sockets have no vsock port to clash with.
        let unix = resolve(Settings::default(), "socklb.listen=unix:///run/1025.sock");
        assert!(unix.is_ok());
    }

    #[test]
    fn every_listed_key_is_read() {
        let unset = format!("{:?}", Settings::default());
        for key in &cmdline_keys() {
            // A value no key accepts silently: each either takes it or refuses it.
            match Settings::from_kernel_cmdline(&format!("socklb.{key}=x")) {
                Ok(settings) => assert_ne!(format!("{settings:?}"), unset, "{key} was ignored"),
                Err(err) => assert!(err.to_string().contains(key), "{err}"),
            }
        }
    }

    #[test]
    fn a_repeated_key_adds_to_a_list_and_replaces_a_value() {
        let settings = Settings::from_kernel_cmdline(
            "socklb.pod_ip=10.244.0.5 socklb.pod_ip=fd00::5 \
             socklb.listen=unix:///a socklb.listen=unix:///b",
        )
        .unwrap();
        assert_eq!(settings.pod_ips.len(), 2);
        assert_eq!(settings.listen.as_deref(), Some("unix:///b"));
    }

    #[test]
    fn a_bad_element_of_a_list_is_named() {
        let err = Settings::from_kernel_cmdline("socklb.allow_cid=3,four").unwrap_err();
        assert!(
            err.to_string().contains("socklb.allow_cid: \"four\""),
            "{err}"
        );
    }

    #[test]
    fn a_bare_switch_is_on() {
        let matches = kernel_cmdline_parser()
            .try_get_matches_from(["--bpf-stats", "--allow-kata-port=off"])
            .unwrap();
        let settings = Settings::from_arg_matches(&matches).unwrap();
        assert_eq!(settings.bpf_stats, Some(true));
        assert_eq!(settings.allow_kata_port, Some(false));
        assert_eq!(settings.allow_unprivileged_port, None);
    }

    #[test]
    fn switches_are_on_off_or_an_error() {
        assert!(
            resolve(Settings::default(), "socklb.bpf_stats=yes")
                .unwrap()
                .bpf_stats
        );
        assert!(
            !resolve(Settings::default(), "socklb.bpf_stats=off")
                .unwrap()
                .bpf_stats
        );
        let err = resolve(Settings::default(), "socklb.bpf_stats=maybe").unwrap_err();
        assert!(
            err.to_string().contains("socklb.bpf_stats: \"maybe\""),
            "{err}"
        );
    }

    #[test]
    fn bad_values_are_named() {
        let err = resolve(Settings::default(), "socklb.pod_ip=10.0.0.x").unwrap_err();
        assert!(format!("{err:#}").contains("socklb.pod_ip: \"10.0.0.x\""));
        let given = Settings {
            log_level: Some("loud".into()),
            ..Settings::default()
        };
        assert!(
            resolve(given, "")
                .unwrap_err()
                .to_string()
                .contains("\"loud\"")
        );
    }
}
