//! The process's own series in the names every Prometheus setup knows (`process_*`, as the
//! official client libraries export them), read from /proc at each scrape, plus
//! `agentgate_build_info`.

use agentgate_proto::exposition::{Kind, Scrape};

/// Adds the process series to a scrape.
pub fn add_to(scrape: &mut Scrape) {
    let mut one = |name: &'static str, help: &'static str, kind: Kind, value: f64| {
        scrape.family(name, help, kind).number(vec![], value);
    };
    if let Some(stat) = SelfStat::read() {
        one(
            "process_cpu_seconds_total",
            "User and system CPU time spent, in seconds.",
            Kind::Counter,
            stat.cpu_seconds,
        );
        one(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            Kind::Gauge,
            stat.rss_bytes,
        );
        one(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds.",
            Kind::Gauge,
            stat.start_time_seconds,
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        one(
            "process_open_fds",
            "Open file descriptors.",
            Kind::Gauge,
            fds.count() as f64,
        );
    }
    if let Some(max) = max_fds() {
        one(
            "process_max_fds",
            "The soft limit on open file descriptors.",
            Kind::Gauge,
            max,
        );
    }
    one(
        "agentgate_accept_errors_total",
        "Failed accepts on any listener (EMFILE: the open-file limit).",
        Kind::Counter,
        agentgate_transport::ACCEPT_HEALTH.failures() as f64,
    );
    agentgate_proto::build_info::add_metric(scrape);
}

struct SelfStat {
    cpu_seconds: f64,
    rss_bytes: f64,
    start_time_seconds: f64,
}

impl SelfStat {
    fn read() -> Option<Self> {
        // SAFETY: sysconf only reads configuration values.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as f64;
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        // rest[0] is field 3 (state): utime is field 14, stime 15, starttime 22, rss 24.
        let field = |n: usize| f.get(n - 3)?.parse::<f64>().ok();
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())?;
        Some(Self {
            cpu_seconds: (field(14)? + field(15)?) / ticks,
            rss_bytes: field(24)? * page,
            start_time_seconds: boot + field(22)? / ticks,
        })
    }
}

fn max_fds() -> Option<f64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_process_series_are_there_and_plausible() {
        let mut scrape = agentgate_proto::exposition::Scrape::default();
        super::add_to(&mut scrape);
        let out = scrape.render();
        let value = |name: &str| -> f64 {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} missing:\n{out}"))
                .parse()
                .unwrap()
        };
        assert!(value("process_resident_memory_bytes") > 1e6);
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_max_fds") >= value("process_open_fds"));
        let start = value("process_start_time_seconds");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            start > now - 3600.0 && start <= now + 1.0,
            "{start} vs {now}"
        );
        assert!(out.contains("agentgate_build_info{version=\""));
    }
}
