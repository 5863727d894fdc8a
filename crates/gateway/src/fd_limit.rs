//! The open-file limit: every agent connection is a file descriptor, so a gateway under a
//! stock soft limit (1,024 under systemd) stops accepting at about a thousand agents. At start
//! the soft limit is raised to the hard limit, and a warning says when even that is below
//! what `max_connections` needs.

/// Descriptors beyond the agent connections: listeners, API and admin callers, upstream and
/// backend connections, Redis, log files.
pub const HEADROOM: u64 = 1024;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns (soft, hard) after.
fn raise() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let wanted = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// Raises the limit and warns when `max_connections` agents would not fit under it.
pub fn prepare(max_connections: usize) {
    let need = max_connections as u64 + HEADROOM;
    match raise() {
        Ok((soft, hard)) if soft < need => tracing::warn!(
            soft,
            hard,
            max_connections,
            "the open-file limit ({soft}) is below max_connections plus {HEADROOM} for \
             everything else: the gateway will refuse agents at about {} connections; raise \
             the hard limit (systemd: LimitNOFILE={need}) or lower max_connections",
            soft.saturating_sub(HEADROOM)
        ),
        Ok((soft, hard)) => tracing::info!(soft, hard, "open-file limit"),
        Err(e) => tracing::warn!("cannot read or raise the open-file limit: {e}"),
    }
}
