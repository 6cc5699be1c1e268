//! Socket options and the process's descriptor limit: TCP keepalive and
//! TCP_NODELAY for every connection, RLIMIT_NOFILE raised at start.

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;
use tracing::{debug, info, warn};

/// TCP_NODELAY and TCP keepalive on a socket (a listener's accepted
/// sockets inherit both on Linux).
pub(crate) fn set_nodelay_and_keepalive(socket: &socket2::SockRef<'_>) {
    if let Err(e) = socket.set_tcp_nodelay(true) {
        debug!("cannot set TCP_NODELAY: {e}");
    }
    if let Err(e) = socket.set_tcp_keepalive(&keep_alive_probes()) {
        debug!("cannot enable TCP keepalive: {e}");
    }
}

/// TCP keepalive, so a peer that vanished without a FIN (a phone that
/// changed networks, a host that lost power) is noticed within minutes and
/// its connection or WebSocket tunnel freed, instead of held forever.
pub(crate) fn keep_alive(stream: &TcpStream) {
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keep_alive_probes()) {
        debug!("cannot enable TCP keepalive: {e}");
    }
}

/// First probe after 60 s idle, then every 10 s.
pub(crate) fn keep_alive_probes() -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new().with_time(Duration::from_secs(60)).with_interval(Duration::from_secs(10))
}

/// RLIMIT_NOFILE as (soft, hard); `None` where it can't be read.
pub(crate) fn fd_limit() -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes into the struct we own.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            #[allow(clippy::useless_conversion)] // rlim_t is u64 on Linux, not everywhere
            return Some((u64::from(limit.rlim_cur), u64::from(limit.rlim_max)));
        }
        None
    }
    #[cfg(not(unix))]
    None
}

/// Raises the soft open-file limit to the hard one, as nginx's
/// `worker_rlimit_nofile` and Go's runtime do: a proxy holds two
/// descriptors per WebSocket, and the usual soft default (1024) is far too
/// low. Logs the limit in force; returns it.
pub(crate) fn raise_fd_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let (soft, hard) = fd_limit()?;
        if soft < hard {
            #[allow(clippy::useless_conversion)]
            let limit = libc::rlimit {
                rlim_cur: hard.try_into().unwrap_or(libc::RLIM_INFINITY),
                rlim_max: hard.try_into().unwrap_or(libc::RLIM_INFINITY),
            };
            // SAFETY: setrlimit reads the struct we own.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
                let e = io::Error::last_os_error();
                warn!(soft, hard, "cannot raise the open-file limit to its hard limit: {e}");
                return Some(soft);
            }
        }
        let (now, hard) = fd_limit()?;
        #[allow(clippy::unnecessary_cast)] // RLIM_INFINITY is u64 on Linux, not everywhere
        if now == libc::RLIM_INFINITY as u64 {
            info!("open-file limit (RLIMIT_NOFILE): unlimited");
        } else if now > soft {
            info!(limit = now, hard, raised_from = soft, "open-file limit (RLIMIT_NOFILE), raised to the hard limit");
        } else {
            info!(limit = now, hard, "open-file limit (RLIMIT_NOFILE)");
        }
        Some(now)
    }
    #[cfg(not(unix))]
    None
}
