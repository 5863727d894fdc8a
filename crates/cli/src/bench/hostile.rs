//! `agentgate bench hostile`: agents serving tunnelled requests while hostile connections
//! attack the same agent port, one attack at a time.
//!
//! Per attack: legitimate requests that failed (target 0), the gateway's RSS peak over its
//! baseline, the gateway's CPU during the attack, and how long the gateway took to shed the
//! attack's connections. Attackers run in their own processes (`bench-attack`), spread over
//! many loopback source addresses, so the per-source limits see a realistic share.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::attack::{Attack, AttackReport};
use super::procs::{self, Kid};
use super::{progress, Bench};

/// Hostile connections per attacker process (the open-file cap is 20,000 per process).
const CONNS_PER_ATTACKER: usize = 2500;
/// Concurrent legitimate requests kept going during each attack.
const LEGIT_CONCURRENCY: usize = 4;

#[derive(Serialize)]
pub struct HostileRow {
    pub attack: &'static str,
    pub hostile_connections: usize,
    pub opened: usize,
    pub shed: usize,
    pub shed_secs_max: f64,
    pub shed_secs_p50: f64,
    pub legit_ok: u64,
    pub legit_failed: u64,
    pub rss_peak_over_baseline_mib: f64,
    pub gateway_cpu_secs: f64,
}

impl Bench {
    pub(super) async fn hostile(&mut self) -> anyhow::Result<Vec<HostileRow>> {
        let gw = self.gateway(None).await?;
        let _load = self.load(&gw, "grpc", "bench", self.args.agents)?;
        self.wait_connected(&gw, "grpc", self.args.agents, "hostile")
            .await?;
        let mut rows = vec![];
        let url = Arc::new(format!("http://{}/agents/bench/proxy/bytes/1000", gw.api));
        for (i, attack) in Attack::ALL.into_iter().enumerate() {
            progress(&format!("hostile: {}", attack.name()));
            tokio::time::sleep(Duration::from_secs(1)).await;
            let rss0 = gw.kid.rss_kib();
            let cpu0 = gw.kid.cpu();
            let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
            let stop = tokio_util::sync::CancellationToken::new();
            let mut legit = vec![];
            for _ in 0..LEGIT_CONCURRENCY {
                let (ok, failed, stop, url) =
                    (ok.clone(), failed.clone(), stop.clone(), url.clone());
                let me = self.fetcher();
                legit.push(tokio::spawn(async move {
                    while !stop.is_cancelled() {
                        match me.fetch(&url).await {
                            Ok(1000) => ok.fetch_add(1, Ordering::Relaxed),
                            _ => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                }));
            }
            let total = self.args.hostile;
            let procs_n = total.div_ceil(CONNS_PER_ATTACKER).max(1);
            let port = if attack.wants_tls_port() {
                gw.tls_port
            } else {
                gw.clear_port
            };
            let mut attackers = vec![];
            for p in 0..procs_n {
                let n = total / procs_n + usize::from(p < total % procs_n);
                let log = self.dir.join(format!("attack-{i}-{p}.log"));
                let args: Vec<String> = vec![
                    "bench-attack".into(),
                    "--kind".into(),
                    attack.arg(),
                    "--target".into(),
                    format!("127.0.0.1:{port}"),
                    "--conns".into(),
                    n.to_string(),
                    "--secs".into(),
                    self.args.attack_secs.to_string(),
                    "--net".into(),
                    (100 + p).to_string(),
                ];
                attackers.push((Kid::spawn(&args, &log)?, log));
            }
            let sampler = procs::PeakRss::start(gw.kid.pid(), rss0);
            let mut sum = AttackReport::default();
            let t0 = Instant::now();
            for (mut kid, log) in attackers {
                let limit = Duration::from_secs(self.args.attack_secs + 30);
                while kid.child.try_wait()?.is_none() {
                    anyhow::ensure!(t0.elapsed() < limit, "an attacker did not finish");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let text = std::fs::read_to_string(&log)?;
                let r: serde_json::Value = text
                    .lines()
                    .rev()
                    .find_map(|l| serde_json::from_str(l).ok())
                    .ok_or_else(|| anyhow::anyhow!("attacker printed no report: {text}"))?;
                let get = |k: &str| r[k].as_u64().unwrap_or(0);
                sum.opened += get("opened") as usize;
                sum.connect_failed += get("connect_failed") as usize;
                sum.shed += get("shed") as usize;
                sum.shed_ms_max = sum.shed_ms_max.max(get("shed_ms_max"));
                sum.shed_ms_p50 = sum.shed_ms_p50.max(get("shed_ms_p50"));
            }
            stop.cancel();
            for l in legit {
                let _ = l.await;
            }
            let row = HostileRow {
                attack: attack.name(),
                hostile_connections: total,
                opened: sum.opened,
                shed: sum.shed,
                shed_secs_max: sum.shed_ms_max as f64 / 1000.0,
                shed_secs_p50: sum.shed_ms_p50 as f64 / 1000.0,
                legit_ok: ok.load(Ordering::Relaxed),
                legit_failed: failed.load(Ordering::Relaxed),
                rss_peak_over_baseline_mib: sampler.peak_kib().saturating_sub(rss0) as f64 / 1024.0,
                gateway_cpu_secs: (gw.kid.cpu().saturating_sub(cpu0)).as_secs_f64(),
            };
            rows.push(row);
        }
        Ok(rows)
    }
}

pub fn table(rows: &[HostileRow], agents: usize, secs: u64) -> String {
    let mut out = format!(
        "{agents} agents serving tunnelled requests ({LEGIT_CONCURRENCY} at a time) while each attack \
         runs for up to {secs} s\n\n\
         | attack | legit failed | legit ok | gateway RSS peak over baseline MiB | gateway CPU s | shed / opened | time to shed, p50 s | max s |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.2} | {} / {} | {:.2} | {:.2} |\n",
            r.attack,
            r.legit_failed,
            r.legit_ok,
            r.rss_peak_over_baseline_mib,
            r.gateway_cpu_secs,
            r.shed,
            r.opened,
            r.shed_secs_p50,
            r.shed_secs_max
        ));
    }
    out
}
