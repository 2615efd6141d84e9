//! Connection slots: at most `daemon.max_connections` in all, at most
//! `daemon.max_connections_per_uid` for one user, and the last
//! `daemon.admin_connections` kept for administrators, so that one user
//! cannot take every slot and lock everyone else, root included, out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The limits, fixed at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub total: u32,
    pub per_uid: u32,
    pub admin_only: u32,
}

/// Why a connection was turned away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Every slot is taken.
    Full { total: u32 },
    /// Only the slots kept for administrators are left.
    AdminsOnly { total: u32, admin_only: u32 },
    /// This user holds as many as one user may.
    PerUid { uid: u32, per_uid: u32 },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Full { total } => write!(
                f,
                "gpuctld serves at most {total} connections at once (daemon.max_connections); try again later"
            ),
            Refusal::AdminsOnly { total, admin_only } => write!(
                f,
                "gpuctld serves {total} connections at once and keeps the last {admin_only} for administrators (daemon.admin_connections); try again later"
            ),
            Refusal::PerUid { uid, per_uid } => write!(
                f,
                "uid {uid} already holds {per_uid} connections, as many as one user may (daemon.max_connections_per_uid); close some first"
            ),
        }
    }
}

/// Whether one more connection may be served: `in_use` slots are taken in
/// all, `of_uid` by its user; `admin`: whether that user is an
/// administrator, who may take any slot and is not limited per uid.
pub fn admit(limits: Limits, in_use: u32, of_uid: u32, admin: bool) -> Result<(), Refusal> {
    if in_use >= limits.total {
        return Err(Refusal::Full {
            total: limits.total,
        });
    }
    if admin {
        return Ok(());
    }
    if in_use >= limits.total.saturating_sub(limits.admin_only) {
        return Err(Refusal::AdminsOnly {
            total: limits.total,
            admin_only: limits.admin_only,
        });
    }
    if of_uid >= limits.per_uid {
        return Err(Refusal::PerUid {
            uid: 0,
            per_uid: limits.per_uid,
        });
    }
    Ok(())
}

#[derive(Default)]
struct Counts {
    total: u32,
    by_uid: HashMap<u32, u32>,
}

/// The slots in use; shared by the accept loop and the connections' guards.
#[derive(Clone)]
pub struct Slots {
    limits: Limits,
    counts: Arc<Mutex<Counts>>,
}

/// One slot, given back when the connection ends.
pub struct Slot {
    uid: u32,
    counts: Arc<Mutex<Counts>>,
}

impl Slots {
    /// Slots within `limits`; at least one is always left to others.
    pub fn new(limits: Limits) -> Slots {
        Slots {
            limits: Limits {
                admin_only: limits.admin_only.min(limits.total.saturating_sub(1)),
                ..limits
            },
            counts: Arc::default(),
        }
    }

    /// Takes a slot for a connection of `uid`. `is_admin` is asked only when
    /// the answer matters (it may read /proc and the group database).
    pub fn take(&self, uid: u32, is_admin: impl FnOnce() -> bool) -> Result<Slot, Refusal> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let of_uid = counts.by_uid.get(&uid).copied().unwrap_or(0);
        admit(self.limits, counts.total, of_uid, false)
            .or_else(|refusal| match refusal {
                Refusal::Full { .. } => Err(refusal),
                _ if is_admin() => admit(self.limits, counts.total, of_uid, true),
                _ => Err(refusal),
            })
            .map_err(|refusal| match refusal {
                Refusal::PerUid { per_uid, .. } => Refusal::PerUid { uid, per_uid },
                other => other,
            })?;
        counts.total += 1;
        *counts.by_uid.entry(uid).or_insert(0) += 1;
        Ok(Slot {
            uid,
            counts: self.counts.clone(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.by_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                counts.by_uid.remove(&self.uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        total: 10,
        per_uid: 4,
        admin_only: 2,
    };

    #[test]
    fn one_user_cannot_take_every_slot() {
        assert_eq!(admit(LIMITS, 0, 0, false), Ok(()));
        assert_eq!(
            admit(LIMITS, 4, 4, false),
            Err(Refusal::PerUid { uid: 0, per_uid: 4 })
        );
        assert_eq!(
            admit(LIMITS, 4, 4, true),
            Ok(()),
            "administrators are exempt"
        );
    }

    #[test]
    fn the_last_slots_are_for_administrators() {
        assert_eq!(admit(LIMITS, 7, 0, false), Ok(()));
        assert_eq!(
            admit(LIMITS, 8, 0, false),
            Err(Refusal::AdminsOnly {
                total: 10,
                admin_only: 2
            })
        );
        assert_eq!(admit(LIMITS, 9, 0, true), Ok(()));
        assert_eq!(admit(LIMITS, 10, 0, true), Err(Refusal::Full { total: 10 }));
    }

    #[test]
    fn slots_are_counted_per_user_and_given_back() {
        let slots = Slots::new(LIMITS);
        let mut held: Vec<Slot> = (0..4)
            .map(|_| slots.take(1000, || false).unwrap())
            .collect();
        let refusal = slots.take(1000, || false).err().unwrap();
        assert_eq!(
            refusal,
            Refusal::PerUid {
                uid: 1000,
                per_uid: 4
            }
        );
        assert!(refusal.to_string().contains("uid 1000 already holds 4"));
        let mut asked = false;
        assert!(slots
            .take(0, || {
                asked = true;
                true
            })
            .is_ok());
        assert!(
            !asked,
            "an administrator is only asked about when it matters"
        );
        held.pop();
        assert!(
            slots.take(1000, || false).is_ok(),
            "a slot given back is free"
        );
    }
}
