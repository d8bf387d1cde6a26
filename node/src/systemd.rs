//! The service manager's notification protocol (`sd_notify`, `Type=notify`): READY once the
//! listeners accept, RELOADING around a SIGHUP reload, STOPPING at shutdown, and a one-line
//! STATUS. Without `NOTIFY_SOCKET` (not started by systemd) every call does nothing.

use sd_notify::NotifyState;
use tracing::warn;

fn send(what: &str, states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, state = what, "cannot notify the service manager");
    }
}

/// Start-up finished (the front door's listeners accept clients), or a reload did.
pub fn ready(status: &str) {
    send("READY", &[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload starts (`Type=notify-reload` needs the monotonic time beside it).
pub fn reloading() {
    let mut states = vec![NotifyState::Reloading];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    send("RELOADING", &states);
}

/// Shutdown began.
pub fn stopping() {
    send(
        "STOPPING",
        &[NotifyState::Stopping, NotifyState::Status("stopping")],
    );
}
