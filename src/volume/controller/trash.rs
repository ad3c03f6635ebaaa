//! The RBD trash as this driver uses it: a record for every image it moves there, and a purger per
//! (cluster, pool, RADOS namespace) that removes exactly the recorded images once their deferment
//! has ended.
//!
//! Names prove nothing in the trash: ceph-csi's default prefix is ours too, and people trash
//! images by hand. So before an image goes to the trash, a record object named after its image
//! ID is written in its pool and namespace (`rook-rbd.trash.<id>`), and only a trash entry with a
//! record is ever removed. Why this shape, and what a crash at each step leaves behind:
//!
//! - The record is written *before* the move. A crash between the two leaves a record for an
//!   image that is still live. The purger acts only on trash entries, so that image is untouched,
//!   and the CO's retry of the delete finds it by name, writes the same record (same ID) again and
//!   moves it. The other order could lose an entry: a crash right after the move would leave a
//!   trashed image that nothing ever purges.
//! - Keyed by image ID, not by name: an ID belongs to one image for its whole life, in the trash
//!   or out, and is never reused, while a name is free again the moment its image is trashed.
//! - One object per image, written whole by one `write_full`: atomic, with no shared index to
//!   read, modify and write, so concurrent deletes (or two controllers during a leader handover)
//!   never lose each other's entries.
//! - A record is only ever written for an image that a Delete call asked us to delete, so it can
//!   never invent an entry for anything else. (If a crash left a record on a live image and
//!   someone later trashes that image by hand, it is purged: it is the image the CO asked us to
//!   delete.)
//! - The record is removed *after* the image. A crash in between leaves a record naming an ID that
//!   no longer exists, so it matches nothing, ever.
//! - `rbd trash restore` takes an image back: the purger then finds no trash entry for the ID and
//!   drops the record.
//!
//! The deferment is the record's `purge_after`; librbd's own deferment of our entries is 0, so
//! `rbd trash ls` shows them as removable at once. A restarted driver resumes from the records:
//! each new purger first scans its pool's trash for entries that have one.

use super::{Controller, TRASH_SOURCE_USER};
use crate::ceph::pool::blocking;
use crate::ceph::{CephError, ConnectionPool, IoCtx};
use crate::volume::naming::TEMP_SNAP_PREFIX;
use crate::volume::{ClusterConfig, ClusterEntry, Credentials};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

pub(super) const RECORD_PREFIX: &str = "rook-rbd.trash.";
pub(super) const IN_USE: &str = "is still in use: the image is mapped or watched by a client";
/// How long an idle purger sleeps when nothing wakes it.
const IDLE: Duration = Duration::from_secs(3600);
/// Purges one purger runs at once.
const PURGE_PARALLELISM: usize = 8;
/// The longest wait before a failed purge is tried again.
const MAX_BACKOFF_SECS: u64 = 300;
/// The longest wait before a purge that found its image open is tried again: one open attempt
/// every few seconds is cheap, and a dead client's watch is gone 30 s after it died.
const BUSY_RETRY_SECS: u64 = 4;

/// What the record object of a trashed image holds (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Record {
    /// The image's name when it was trashed.
    pub name: String,
    /// Unix seconds.
    pub deleted_at: u64,
    /// Unix seconds; the image is never purged before this second.
    pub purge_after: u64,
    /// The image a clone was made from, (pool, image ID): once the clone is purged, a trashed
    /// parent may be free to go. Kept here so that a purge never has to open the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<(String, String)>,
}

impl Record {
    pub fn new(
        name: &str,
        now: Duration,
        deferment: Duration,
        parent: Option<(String, String)>,
    ) -> Self {
        let end = now + deferment;
        Self {
            name: name.to_string(),
            deleted_at: now.as_secs(),
            // Rounded up, so a purge at a whole second >= purge_after is never early; with no
            // deferment there is nothing to be early for.
            purge_after: end.as_secs() + u64::from(!deferment.is_zero() && end.subsec_nanos() > 0),
            parent,
        }
    }
}

pub(super) fn record_object(image_id: &str) -> String {
    format!("{RECORD_PREFIX}{image_id}")
}

fn now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// An image this process moved to the trash.
#[derive(Debug, Clone)]
pub(super) struct Trashed {
    pub id: String,
    pub record: Record,
}

/// Refused: something watches the image (its ID).
#[derive(Debug)]
pub(super) struct Watched(pub String);

/// Blocking: records the image, then moves it to the trash (see the module doc for the order).
/// `None` when no image has that name.
pub(super) fn record_and_trash(
    io: &IoCtx,
    name: &str,
    deferment: Duration,
) -> Result<Result<Option<Trashed>, Watched>, CephError> {
    // Read-only: no watch of our own, so any watcher is another client.
    let img = match io.open_image_read_only(name) {
        Err(e) if e.not_found() => return finish_interrupted_move(io, name),
        r => r?,
    };
    let id = img.id()?;
    // librbd moves a watched image to the trash without complaint; a mapped volume must stay.
    if !img.watchers()?.is_empty() {
        return Ok(Err(Watched(id)));
    }
    let parent = img.parent()?.map(|p| (p.pool, p.image_id));
    let special = img.librbd_moves_specially()?;
    drop(img);
    // librbd's move opens the image again, watches it and takes its lock: most of a delete's
    // round trips, and nothing this image needs once the checks above and `mirrored` pass.
    let own_move = !special && !io.mirrored(&id)?;
    let record = Record::new(name, now(), deferment, parent);
    let json = serde_json::to_vec(&record).expect("a record serializes");
    io.write_full(&record_object(&id), &json)?;
    let moved = if own_move {
        io.trash_move_unopened(name, &id)
    } else {
        io.trash_move(name)
    };
    match moved {
        Ok(()) => Ok(Ok(Some(Trashed { id, record }))),
        Err(e) if e.is(libc::EBUSY) => {
            // Certainly not moved: the record would only stand on a live image.
            io.remove_object(&record_object(&id))?;
            Ok(Err(Watched(id)))
        }
        // Moved by a delete beside us, which recorded the same ID; nothing left to do.
        Err(e) if e.not_found() => Ok(Ok(None)),
        // The move may have happened (a timeout): the record stays, a retry rewrites it.
        Err(e) => Err(e),
    }
}

/// Blocking: a move that a kill interrupted leaves its trash entry "pending moving", which
/// librbd refuses to remove (EUCLEAN) and nothing else finishes; a move of the same name finishes
/// it. The record was written before that move, so the entry is one to purge.
fn finish_interrupted_move(
    io: &IoCtx,
    name: &str,
) -> Result<Result<Option<Trashed>, Watched>, CephError> {
    match io.trash_move(name) {
        Ok(()) => {}
        Err(e) if e.not_found() => return Ok(Ok(None)),
        Err(e) => return Err(e),
    }
    tracing::info!(pool = %io.location(), image = name, "finished a trash move that was interrupted");
    for e in io.trash_list()? {
        if e.name != name || e.source != TRASH_SOURCE_USER {
            continue;
        }
        let record = io.read_small(&record_object(&e.id))?;
        if let Some(record) = record.and_then(|r| serde_json::from_slice::<Record>(&r).ok()) {
            return Ok(Ok(Some(Trashed { id: e.id, record })));
        }
    }
    Ok(Ok(None))
}

/// How one purge attempt ended.
#[derive(Debug, PartialEq, Eq)]
enum Purged {
    /// The image and its record are gone (or the image was restored, and the record is gone).
    Done,
    /// Not yet: dependents keep it (their purge pokes it again).
    Waiting(&'static str),
    /// Not yet: a client has it open. Nothing pokes it when that client goes, and a client that
    /// died (a driver killed while it purged) holds its watch until the OSD drops it, 30 s
    /// later: it is tried again soon, never after a long backoff.
    Busy,
}

/// Blocking: removes a recorded trash entry, then its record. It never opens the image on the
/// way (an open is a watch, and a watched image cannot be removed by anyone, another controller
/// purging the same pool included), except to drop our leftover temporary snapshots.
fn purge_one(io: &IoCtx, id: &str) -> Result<Purged, CephError> {
    let mut dropped_temp_snaps = false;
    loop {
        match io.trash_remove(id) {
            Ok(()) => break,
            // Gone, or restored by someone (`rbd trash restore`): either way, not ours to purge.
            // librbd also says ENOENT when something the image points at is missing (a clone's
            // parent): then the entry is still there, and dropping its record would leave it in
            // the trash for good. Keep the record and try again later.
            Err(e) if e.not_found() => {
                if io.trash_list()?.iter().any(|t| t.id == id) {
                    return Err(e);
                }
                break;
            }
            Err(e) if e.is(libc::ENOTEMPTY) && !dropped_temp_snaps => {
                // A temporary snapshot left by an interrupted clone would keep it forever.
                dropped_temp_snaps = true;
                if !drop_temp_snaps(io, id)? {
                    return Ok(Purged::Waiting("it still has snapshots"));
                }
            }
            Err(e) if e.is(libc::ENOTEMPTY) || e.is(libc::EMLINK) => {
                return Ok(Purged::Waiting("clones or snapshots still depend on it"))
            }
            Err(e) if e.is(libc::EBUSY) => return Ok(Purged::Busy),
            Err(e) => return Err(e),
        }
    }
    io.remove_object(&record_object(id))?;
    Ok(Purged::Done)
}

/// Removes our temporary snapshots from a trashed image; whether there were any.
fn drop_temp_snaps(io: &IoCtx, id: &str) -> Result<bool, CephError> {
    let img = io.open_image_by_id(id)?;
    let mut any = false;
    for s in img.snaps()? {
        if s.name.starts_with(TEMP_SNAP_PREFIX) {
            match img.snap_remove(&s.name) {
                Err(e) if !e.not_found() => return Err(e),
                _ => any = true,
            }
        }
    }
    Ok(any)
}

/// Blocking: the recorded entries in a pool's trash. A record whose name differs from the
/// entry's, or that does not parse, is left alone: it is not something we wrote for this image.
fn scan(io: &IoCtx) -> Result<Vec<(String, Record)>, CephError> {
    let mut found = Vec::new();
    for e in io.trash_list()? {
        if e.source != TRASH_SOURCE_USER {
            continue;
        }
        let Some(raw) = io.read_small(&record_object(&e.id))? else {
            continue;
        };
        match serde_json::from_slice::<Record>(&raw) {
            Ok(r) if r.name == e.name => found.push((e.id, r)),
            _ => tracing::warn!(
                pool = io.pool(),
                image.id = %e.id,
                "trash record does not match its entry; leaving both alone"
            ),
        }
    }
    Ok(found)
}

#[derive(Debug, Clone)]
struct Entry {
    record: Record,
    /// Unix seconds before which no new attempt is made (after a failed one).
    retry_at: u64,
    failures: u32,
    /// Something that may free it happened since its last attempt began.
    poked: bool,
    /// An attempt is running: librbd has the image open, and a clone's parent too.
    purging: bool,
}

impl Entry {
    fn due_at(&self) -> u64 {
        self.record.purge_after.max(self.retry_at)
    }
}

/// What a purger knows about its pool's trash.
struct State {
    creds: Credentials,
    entries: BTreeMap<String, Entry>,
    /// Look for records in the trash (at start, and when a delete recorded something elsewhere).
    rescan: bool,
}

impl State {
    /// The next entry to purge at `now` (unix seconds), of those not being purged (`busy`).
    fn next_due(&self, now: u64, busy: &HashSet<String>) -> Option<String> {
        self.entries
            .iter()
            .filter(|(id, e)| e.due_at() <= now && !busy.contains(*id))
            .min_by_key(|(_, e)| e.due_at())
            .map(|(id, _)| id.clone())
    }

    /// How long until the next entry is due, from `now`.
    fn sleep(&self, now: Duration) -> Duration {
        match self.entries.values().map(Entry::due_at).min() {
            None => IDLE,
            Some(due) => Duration::from_secs(due).saturating_sub(now),
        }
    }

    /// An attempt on `id` begins: only what happens from now on counts as news for it.
    fn attempt(&mut self, id: &str) {
        if let Some(e) = self.entries.get_mut(id) {
            e.poked = false;
            e.purging = true;
        }
    }

    /// The attempt on `id` failed; returns how many have. If something that may free it
    /// happened meanwhile, it is tried again at once, else after a backoff.
    fn failed(&mut self, id: &str, now: u64) -> u32 {
        let Some(e) = self.entries.get_mut(id) else {
            return 0;
        };
        e.failures += 1;
        e.purging = false;
        e.retry_at = if e.poked {
            0
        } else {
            now + backoff(e.failures)
        };
        e.failures
    }

    /// The attempt on `id` found the image open by a client: as `failed`, but tried again within
    /// `BUSY_RETRY_SECS`.
    fn failed_busy(&mut self, id: &str, now: u64) -> u32 {
        let n = self.failed(id, now);
        if let Some(e) = self.entries.get_mut(id) {
            e.retry_at = e.retry_at.min(now + BUSY_RETRY_SECS);
        }
        n
    }

    /// Something may have freed a dependent: try every waiting entry again.
    fn retry_waiting(&mut self) {
        for e in self.entries.values_mut() {
            e.retry_at = 0;
            e.poked = true;
        }
    }

    /// The one entry that may have been freed; whether it is here.
    fn retry(&mut self, id: &str) -> bool {
        let Some(e) = self.entries.get_mut(id) else {
            return false;
        };
        e.retry_at = 0;
        e.poked = true;
        true
    }
}

/// Seconds before attempt `failures + 1`: 1, 2, 4, ... up to five minutes. Short at first: a
/// client that had the image open (another controller purging it too) is gone in moments.
fn backoff(failures: u32) -> u64 {
    (1u64 << failures.saturating_sub(1).min(16)).min(MAX_BACKOFF_SECS)
}

/// One pool's (or RADOS namespace's) purger: a task that sleeps until the next entry is due or
/// something wakes it. Each namespace has a trash of its own.
struct Purger {
    cluster: ClusterEntry,
    pool: String,
    namespace: String,
    /// `pool` or `pool/namespace`, for logs.
    location: String,
    state: Mutex<State>,
    wake: Notify,
}

/// (cluster, pool, namespace)
type Key = (String, String, String);

fn key(cluster: &str, pool: &str, namespace: &str) -> Key {
    (cluster.into(), pool.into(), namespace.into())
}

/// Every purger of this process.
pub(super) struct Trash {
    conns: Arc<ConnectionPool>,
    clusters: ClusterConfig,
    purgers: Mutex<HashMap<Key, Arc<Purger>>>,
}

impl Trash {
    pub fn new(conns: Arc<ConnectionPool>, clusters: ClusterConfig) -> Arc<Self> {
        Arc::new(Self {
            conns,
            clusters,
            purgers: Mutex::new(HashMap::new()),
        })
    }

    /// The purger of a pool, started (with a scan for an earlier process's records) if new.
    /// The credentials are the latest a caller had for that pool.
    fn purger(
        self: &Arc<Self>,
        cluster: &str,
        pool: &str,
        namespace: &str,
        creds: &Credentials,
    ) -> Option<Arc<Purger>> {
        let entry = self.clusters.get(cluster)?.clone();
        let mut all = self.purgers.lock().unwrap();
        let key = key(cluster, pool, namespace);
        if let Some(p) = all.get(&key) {
            p.state.lock().unwrap().creds = creds.clone();
            return Some(p.clone());
        }
        let p = Arc::new(Purger {
            cluster: entry,
            pool: pool.to_string(),
            namespace: namespace.to_string(),
            location: match namespace {
                "" => pool.to_string(),
                ns => format!("{pool}/{ns}"),
            },
            state: Mutex::new(State {
                creds: creds.clone(),
                entries: BTreeMap::new(),
                rescan: true,
            }),
            wake: Notify::new(),
        });
        all.insert(key, p.clone());
        tokio::spawn(p.clone().run(self.clone()));
        Some(p)
    }

    /// Purges what an earlier process recorded in this pool and namespace.
    pub fn watch(
        self: &Arc<Self>,
        cluster: &str,
        pool: &str,
        namespace: &str,
        creds: &Credentials,
    ) {
        self.purger(cluster, pool, namespace, creds);
    }

    /// An image we just recorded and trashed: purge it when its deferment ends.
    pub fn add(
        self: &Arc<Self>,
        (cluster, pool, namespace): (&str, &str, &str),
        creds: &Credentials,
        t: Trashed,
    ) {
        let Some(p) = self.purger(cluster, pool, namespace, creds) else {
            return;
        };
        p.state.lock().unwrap().entries.insert(
            t.id,
            Entry {
                record: t.record,
                retry_at: 0,
                failures: 0,
                poked: false,
                purging: false,
            },
        );
        p.wake.notify_one();
    }

    /// An image in a pool and namespace of these names was deleted (a dependent may be gone);
    /// with `rescan`, one was recorded and trashed by a caller that only knows the names.
    pub fn poke(&self, pool: &str, namespace: &str, rescan: bool) {
        let all = self.purgers.lock().unwrap();
        let mut found = false;
        for ((_, p, ns), purger) in all.iter() {
            if p == pool && ns == namespace {
                found = true;
                let mut st = purger.state.lock().unwrap();
                st.rescan |= rescan;
                st.retry_waiting();
                drop(st);
                purger.wake.notify_one();
            }
        }
        if rescan && !found {
            tracing::info!(
                pool,
                "an image went to the trash in a pool this process does not purge yet; it is purged after the next DeleteVolume there or a restart"
            );
        }
    }

    /// Whether this process is purging a clone of the image right now: librbd opens the parent
    /// to detach a clone, which looks like a client to a delete of that parent.
    /// Clones are made in the parent's namespace, in any pool.
    pub fn purging_clones_of(
        &self,
        (cluster, pool, namespace): (&str, &str, &str),
        image_id: &str,
    ) -> bool {
        let parent = Some((pool.to_string(), image_id.to_string()));
        self.purgers
            .lock()
            .unwrap()
            .iter()
            .filter(|((c, _, ns), _)| c == cluster && ns == namespace)
            .any(|(_, p)| {
                p.state
                    .lock()
                    .unwrap()
                    .entries
                    .values()
                    .any(|e| e.purging && e.record.parent == parent)
            })
    }

    /// A trashed image whose clone was just purged: if it waits for its dependents, try again.
    fn freed(&self, (cluster, pool, namespace): (&str, &str, &str), id: &str) {
        if let Some(p) = self
            .purgers
            .lock()
            .unwrap()
            .get(&key(cluster, pool, namespace))
        {
            if p.state.lock().unwrap().retry(id) {
                p.wake.notify_one();
            }
        }
    }
}

impl Purger {
    async fn run(self: Arc<Self>, trash: Arc<Trash>) {
        loop {
            let sleep = self.pass(&trash).await;
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }

    /// The pool's I/O context, fetched from the connection pool on every pass so that a
    /// connection the pool replaced is never held on to.
    async fn ioctx(
        &self,
        conns: &ConnectionPool,
        creds: &Credentials,
    ) -> Result<Arc<IoCtx>, CephError> {
        let c = &self.cluster;
        let conn = conns
            .get(&c.cluster_id, &c.monitors, &creds.user, &creds.key)
            .await?;
        if let Some(io) = conn.cached_ioctx(&self.pool, &self.namespace) {
            return Ok(io);
        }
        let (pool, ns) = (self.pool.clone(), self.namespace.clone());
        blocking(move || conn.ioctx_in(&pool, &ns)).await
    }

    /// Scans if asked, then purges every entry that is due; returns how long to sleep.
    async fn pass(&self, trash: &Trash) -> Duration {
        let (creds, rescan) = {
            let mut st = self.state.lock().unwrap();
            (st.creds.clone(), std::mem::take(&mut st.rescan))
        };
        let io = match self.ioctx(&trash.conns, &creds).await {
            Ok(io) => io,
            Err(e) if e.not_found() => {
                tracing::info!(pool = %self.location, "pool is gone, and with it its trash");
                self.state.lock().unwrap().entries.clear();
                return IDLE;
            }
            Err(e) => {
                tracing::warn!(pool = %self.location, error = %e, "trash purge cannot reach its pool; retrying");
                self.state.lock().unwrap().rescan |= rescan;
                return Duration::from_secs(10);
            }
        };
        if rescan {
            match blocking({
                let io = io.clone();
                move || scan(&io)
            })
            .await
            {
                Ok(found) => {
                    let mut st = self.state.lock().unwrap();
                    if !found.is_empty() {
                        tracing::info!(pool = %self.location, entries = found.len(), "resuming trash purges");
                    }
                    for (id, record) in found {
                        st.entries.entry(id).or_insert(Entry {
                            record,
                            retry_at: 0,
                            failures: 0,
                            poked: false,
                            purging: false,
                        });
                    }
                }
                Err(e) => {
                    tracing::warn!(pool = %self.location, error = %e, "scanning the trash failed; retrying");
                    self.state.lock().unwrap().rescan = true;
                    return Duration::from_secs(10);
                }
            }
        }
        // A purge walks the image's objects: several at once, so a burst of deletes that come due
        // together is not served one after the other.
        let mut running = tokio::task::JoinSet::new();
        let mut busy = HashSet::new();
        loop {
            while running.len() < PURGE_PARALLELISM {
                let id = {
                    let mut st = self.state.lock().unwrap();
                    let Some(id) = st.next_due(now().as_secs(), &busy) else {
                        break;
                    };
                    st.attempt(&id);
                    id
                };
                busy.insert(id.clone());
                let io = io.clone();
                running.spawn(async move {
                    let res = blocking({
                        let id = id.clone();
                        move || purge_one(&io, &id)
                    })
                    .await;
                    (id, res)
                });
            }
            // Only a panic outside the blocking call could fail the join; there is none to catch.
            let Some(Ok((id, res))) = running.join_next().await else {
                break;
            };
            busy.remove(&id);
            let now = now().as_secs();
            let mut st = self.state.lock().unwrap();
            match res {
                Ok(Purged::Done) => {
                    let parent = st.entries.remove(&id).and_then(|e| {
                        tracing::info!(pool = %self.location, image = %e.record.name, image.id = %id, "purged from the RBD trash");
                        e.record.parent
                    });
                    // The clone is gone: its parent, if we trashed it, may go too.
                    if let Some((pool, parent)) = parent {
                        if pool == self.pool {
                            st.retry(&parent);
                        } else {
                            drop(st);
                            let at = (
                                self.cluster.cluster_id.as_str(),
                                pool.as_str(),
                                self.namespace.as_str(),
                            );
                            trash.freed(at, &parent);
                        }
                    }
                }
                Ok(Purged::Busy) => {
                    if st.failed_busy(&id, now) == 1 {
                        tracing::info!(pool = %self.location, image.id = %id, "trashed image not purged yet: a client has it open");
                    }
                }
                Ok(Purged::Waiting(why)) => {
                    if st.failed(&id, now) == 1 {
                        tracing::info!(pool = %self.location, image.id = %id, "trashed image not purged yet: {why}");
                    }
                }
                Err(e) => {
                    let n = st.failed(&id, now);
                    tracing::warn!(pool = %self.location, image.id = %id, attempts = n, error = %e, "trash purge failed; retrying");
                }
            }
        }
        self.state.lock().unwrap().sleep(now())
    }
}

impl Controller {
    /// Finds, in every RBD pool of every configured cluster, what an earlier process trashed and
    /// did not purge yet (it may have been killed), and purges it when due. Needs `--secret-dir`;
    /// without it a pool's purges resume with the first delete there.
    pub fn resume_purges(self: &Arc<Self>) {
        let Some(creds) = self.default_creds.clone() else {
            tracing::info!("no --secret-dir: trash purges of an earlier process resume with the first DeleteVolume in their pool");
            return;
        };
        let entries = self.clusters.entries();
        for (cluster, namespace) in
            entries.map(|e| (e.cluster_id.clone(), e.rados_namespace().to_string()))
        {
            let (this, creds) = (self.clone(), creds.clone());
            tokio::spawn(async move {
                let mut delay = Duration::from_secs(1);
                loop {
                    match this.rbd_pools(&cluster, &creds).await {
                        Ok(pools) => {
                            for pool in pools {
                                this.trash.watch(&cluster, &pool, &namespace, &creds);
                            }
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(cluster = %cluster, error = %e, "cannot list pools to resume trash purges; retrying");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(60));
                        }
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(purge_after: u64) -> Entry {
        Entry {
            record: Record {
                name: "n".into(),
                deleted_at: 0,
                purge_after,
                parent: None,
            },
            retry_at: 0,
            failures: 0,
            poked: false,
            purging: false,
        }
    }

    fn state(entries: &[(&str, u64)]) -> State {
        State {
            creds: Credentials {
                user: "u".into(),
                key: crate::secret::Secret::new("k"),
            },
            entries: entries
                .iter()
                .map(|(id, at)| (id.to_string(), entry(*at)))
                .collect(),
            rescan: false,
        }
    }

    #[test]
    fn a_record_is_never_due_before_its_deferment_ends() {
        let now = Duration::from_millis(1_000_400);
        let r = Record::new("img", now, Duration::from_secs(5), None);
        assert_eq!(r.deleted_at, 1000);
        // 1005.4 s rounds up: at whole second 1005 the deferment has not ended.
        assert_eq!(r.purge_after, 1006);
        let r = Record::new("img", now, Duration::ZERO, None);
        assert_eq!(r.purge_after, 1000, "no deferment: due at once");
    }

    #[test]
    fn only_entries_whose_deferment_ended_are_due_earliest_first() {
        let none = HashSet::new();
        let st = state(&[("a", 20), ("b", 10), ("c", 30)]);
        assert_eq!(st.next_due(9, &none), None);
        assert_eq!(st.next_due(25, &none).as_deref(), Some("b"));
        // One being purged already is not handed out twice.
        let busy = HashSet::from(["b".to_string()]);
        assert_eq!(st.next_due(25, &busy).as_deref(), Some("a"));
        assert_eq!(
            st.sleep(Duration::from_millis(9_500)),
            Duration::from_millis(500)
        );
        assert_eq!(state(&[]).sleep(Duration::ZERO), IDLE);
    }

    #[test]
    fn a_failed_purge_backs_off_until_a_delete_may_have_freed_it() {
        let none = HashSet::new();
        let mut st = state(&[("a", 10)]);
        st.attempt("a");
        assert!(
            st.entries["a"].purging,
            "its clone's parent is held open now"
        );
        assert_eq!(st.failed("a", 10), 1);
        assert!(
            !st.entries["a"].purging,
            "between attempts nothing holds it"
        );
        assert_eq!(st.next_due(10, &none), None);
        assert_eq!(st.next_due(11, &none).as_deref(), Some("a"));
        st.attempt("a");
        st.failed("a", 15);
        assert_eq!(st.next_due(16, &none), None);
        st.retry_waiting();
        assert_eq!(st.next_due(16, &none).as_deref(), Some("a"));
        // Freed while an attempt was running: that attempt's failure is stale news.
        st.attempt("a");
        assert!(st.retry("a"));
        st.failed("a", 16);
        assert_eq!(st.next_due(16, &none).as_deref(), Some("a"));
        assert!(!st.retry("b"));
        assert_eq!(backoff(1), 1);
        assert_eq!(backoff(3), 4);
        assert_eq!(backoff(40), MAX_BACKOFF_SECS);
    }

    #[test]
    fn a_purge_that_found_its_image_open_is_tried_again_within_seconds_however_often_it_failed() {
        let none = HashSet::new();
        let mut st = state(&[("a", 0)]);
        for _ in 0..10 {
            st.attempt("a");
            st.failed("a", 100);
        }
        assert_eq!(
            st.next_due(100 + MAX_BACKOFF_SECS - 1, &none),
            None,
            "long backoff for dependents"
        );
        st.attempt("a");
        st.failed_busy("a", 100);
        assert_eq!(st.next_due(100 + BUSY_RETRY_SECS - 1, &none), None);
        assert_eq!(
            st.next_due(100 + BUSY_RETRY_SECS, &none).as_deref(),
            Some("a"),
            "a dead client's watch goes in 30 s: look again soon"
        );
    }
}
