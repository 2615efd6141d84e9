//! Ending a model's worker: asked for (`unload`, reload), decided by policy
//! (idle timeout, LRU, group switch, pressure, reservations), or not at all
//! (a crash); and what follows once the worker has exited.

use std::time::Instant;

use gpuctl_protocol::{Error, ErrorCode, UnloadResponse};
use tokio::sync::oneshot;

use super::entry::{Life, PendingUnload};
use super::queue::fail_all;
use super::sampling::Reclaim;
use super::{not_found, Registry};
use crate::policy::{self, UnloadReason};
use crate::worker::Exit;

impl Registry {
    pub(super) fn next_expiry(&self) -> Option<Instant> {
        policy::next_expiry(&self.views(&self.config()))
    }

    pub(super) fn expire_idle(&mut self) {
        let config = self.config();
        for name in policy::expired(&self.views(&config), Instant::now()) {
            self.unload(&name, UnloadReason::IdleTimeout, false);
        }
    }

    /// Starts unloading `name`: its worker finishes its jobs (or is killed
    /// with `force`) and exits. Returns a receiver told when it is gone.
    pub(super) fn unload(
        &mut self,
        name: &str,
        reason: UnloadReason,
        force: bool,
    ) -> Option<oneshot::Receiver<()>> {
        let entry = self.models.get_mut(name)?;
        let (done, gone) = oneshot::channel();
        let cancelled = Error::new(
            ErrorCode::Cancelled,
            format!("model {name} was unloaded with --force"),
        );
        entry.life = match std::mem::replace(&mut entry.life, Life::Unloaded { retry_at: None }) {
            // Not resident: nothing to end (a load waiting for memory keeps waiting).
            life @ (Life::Unloaded { .. } | Life::WaitingForVram { .. }) => {
                let _ = done.send(());
                life
            }
            Life::Loading {
                since,
                placement,
                kill,
                then,
            } => {
                if force {
                    tracing::info!(model = name, "stopping its load (--force)");
                    kill.cancel();
                    fail_all(&mut entry.queue, &cancelled);
                }
                let mut waiters = then.map(|t| t.waiters).unwrap_or_default();
                waiters.push(done);
                Life::Loading {
                    since,
                    placement,
                    kill,
                    then: Some(PendingUnload { reason, waiters }),
                }
            }
            mut life @ Life::Unloading { .. } => {
                if let Life::Unloading {
                    pid, kill, waiters, ..
                } = &mut life
                {
                    if force && !kill.is_cancelled() {
                        tracing::info!(
                            model = name,
                            pid = *pid,
                            "killing its draining worker (--force)"
                        );
                        kill.cancel();
                        fail_all(&mut entry.queue, &cancelled);
                    }
                    waiters.push(done);
                }
                life
            }
            Life::Ready {
                worker,
                placement,
                held,
                in_flight,
                ..
            } => {
                tracing::info!(
                    model = name,
                    pid = worker.pid,
                    reason = reason.to_string().as_str(),
                    in_flight,
                    force,
                    "unloading"
                );
                let pid = worker.pid;
                let jobs = worker.canceller.clone();
                // Without force it drains; the switch still ends it at once
                // if a later `unload --force` asks.
                let kill = worker.unload();
                if force {
                    kill.cancel();
                    fail_all(&mut entry.queue, &cancelled);
                }
                Life::Unloading {
                    pid,
                    kill,
                    jobs,
                    placement,
                    held,
                    in_flight,
                    reason,
                    since: Instant::now(),
                    waiters: vec![done],
                }
            }
        };
        Some(gone)
    }

    /// `Unload`: one model or all; answered once their workers have exited.
    pub(super) fn unload_request(
        &mut self,
        model: Option<String>,
        force: bool,
        reply: oneshot::Sender<Result<UnloadResponse, Error>>,
    ) {
        let config = self.config();
        let names: Vec<String> = match model {
            Some(name) if self.models.contains_key(&name) => vec![name],
            Some(name) => {
                let _ = reply.send(Err(not_found(&name, &config)));
                return;
            }
            None => self.models.keys().cloned().collect(),
        };
        let mut gone = Vec::new();
        for name in names {
            let resident = self
                .models
                .get(&name)
                .is_some_and(|e| e.pid().is_some() || matches!(e.life, Life::Loading { .. }));
            if let Some(waiter) = self.unload(&name, UnloadReason::Explicit, force) {
                if resident {
                    gone.push((name, waiter));
                }
            }
        }
        tokio::spawn(async move {
            let mut unloaded = Vec::new();
            for (name, waiter) in gone {
                let _ = waiter.await;
                unloaded.push(name);
            }
            let _ = reply.send(Ok(UnloadResponse { unloaded }));
        });
    }

    /// Worker `load` of `name` has exited: told to (its unload is done),
    /// killed because a cancelled job did not stop, or crashed (counted
    /// towards the backoff).
    pub(super) fn on_exited(&mut self, name: &str, load: u64, exit: Exit) {
        let retry_base = self.config().policy.load_retry.0;
        let Some(entry) = self.models.get_mut(name).filter(|e| e.load == load) else {
            return;
        };
        let (placement, held, unloading, waiters) =
            match std::mem::replace(&mut entry.life, Life::Unloaded { retry_at: None }) {
                Life::Ready {
                    placement, held, ..
                } => (placement, held, None, Vec::new()),
                Life::Unloading {
                    placement,
                    held,
                    reason,
                    since,
                    waiters,
                    ..
                } => (placement, held, Some((reason, since)), waiters),
                // A failed load: on_loaded reports it.
                other => {
                    entry.life = other;
                    return;
                }
            };
        let (reason, since) = match (unloading, &exit.stuck) {
            // Killed by its supervisor: not a crash, and no backoff.
            (_, Some(stuck)) => (
                UnloadReason::Stuck {
                    description: stuck.clone(),
                },
                Instant::now(),
            ),
            (Some(unloading), None) if exit.expected => unloading,
            _ => (
                UnloadReason::Crash {
                    description: exit.description.clone(),
                },
                Instant::now(),
            ),
        };
        entry.history.last_unload = Some(reason.clone());
        let reclaim = Reclaim {
            model: name.to_owned(),
            pid: exit.pid,
            device: placement,
            bytes: held,
            reason,
            since,
        };
        if let Some(stuck) = &exit.stuck {
            let message = format!(
                "model {name}: its worker (pid {}) was killed: {stuck} (policy.cancel_grace); the next request loads it again",
                exit.pid
            );
            tracing::warn!(model = name, pid = exit.pid, reason = %stuck, "worker killed: a cancelled job did not stop");
            entry.history.last_error = Some(message);
        } else if exit.expected {
            tracing::info!(model = name, pid = exit.pid, status = %exit.description, "worker exited");
        } else {
            entry.history.failures += 1;
            let failures = entry.history.failures;
            let message = format!(
                "model {name}: its worker (pid {}) died: {}",
                exit.pid, exit.description
            );
            tracing::error!(model = name, pid = exit.pid, status = %exit.description, failures, "worker crashed");
            entry.history.last_error = Some(message);
            // One crash reloads on the next request; repeated ones back off.
            let backoff = policy::retry_backoff(retry_base, failures, policy::Failure::Crash);
            entry.life = Life::Unloaded {
                retry_at: backoff.map(|b| Instant::now() + b),
            };
        }
        for waiter in waiters {
            let _ = waiter.send(());
        }
        self.reclaim(reclaim);
        self.pump(name);
    }
}
