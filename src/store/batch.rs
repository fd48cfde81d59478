//! Loads and saves from concurrent requests, folded into shared statements.
//!
//! A load that arrives while no load statement runs is sent at once, alone,
//! from the request's own future (no task hop) and as the plain
//! primary-key statement: under light load nothing waits and nothing is
//! spent on a shape made for many keys. While one runs, a second starts at
//! once beside it ([`EAGER`]), from its request's own future as well when
//! nothing else was queued; beyond that loads queue, and the next
//! statement to start reads every queued key. Once statements carry many
//! keys ([`CROWD`]), requests are many and one statement runs at a time.
//! Under heavy load one round trip then serves many requests, which is
//! what makes a read cheaper than one statement per request. Reads are
//! read only; the rows due for their idle extension (once per share of the
//! idle timeout) are then extended and read again by one statement for all
//! of them.
//!
//! Few statements at a time batch best, but a statement that stalls (a
//! slow disk read, a descheduled backend) would hold up every load behind
//! it: when none has finished for [`STALL`], the next load opens another
//! slot, up to the configured number.
//!
//! New sessions' inserts are shared the same way: one multi-row insert for
//! the inserts queued at that moment, each id taken left out for its request
//! to draw another. Inserts and saves start up to [`WRITES_EAGER`] at once
//! rather than two: their commits then share a WAL flush.
//!
//! A queued load only joins a statement that starts after it was queued, so
//! it always sees every write committed before its request arrived.
//!
//! Saves of existing rows are folded the same way, each row checked against
//! the version its request loaded: one statement and one commit (one WAL
//! flush) for many requests. A row locked elsewhere is skipped, not waited
//! for, and its request takes the usual conflict path on its own.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use time::OffsetDateTime;
use tokio::sync::oneshot;

use super::{LoadParams, Loaded, NewRow, OwnedRow, PgStore, StoreError};

/// Keys in one statement at most (a power of two).
pub(super) const MAX_KEYS: usize = 128;

/// How long the running statements may go without one finishing before a
/// queued load opens another slot.
const STALL: Duration = Duration::from_millis(5);

/// Statements that start at once, without waiting for [`STALL`]: at low
/// concurrency a second request should not wait a whole statement for the
/// first; beyond this, requests are many and sharing pays.
const EAGER: usize = 2;

/// [`EAGER`] for inserts and saves. A write waits mostly for its commit's
/// WAL flush, which Postgres shares among the commits that arrive together:
/// side by side, a few writes take one flush; queued, each waits a whole
/// flush more.
const WRITES_EAGER: usize = 4;

/// [`CROWD`] for inserts and saves: with more statements starting at once,
/// any statement taken from the queue with more than one write means
/// requests are many. (With four's threshold, four slots each carrying
/// two or three writes would keep starting statements side by side.)
const WRITES_CROWD: usize = 2;

/// Jobs in one statement from which requests count as many: once a
/// statement started from the queue carries this many, a second one no
/// longer starts at once, and a slot that ran one leaves what is queued to
/// the slot still running. One statement at a time then carries every
/// queued job, which takes fewer statements (each parsed, and behind a
/// transaction pooler also planned) than two sharing them.
const CROWD: usize = 4;

/// How a load extends the idle expiry; fixed per session layer. Loads are
/// folded together only when their policies are equal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LoadPolicy {
    /// The idle timeout (`None`: a load never extends the expiry).
    pub(crate) idle: Option<Duration>,
    /// The absolute timeout, which caps any extension.
    pub(crate) absolute: Option<Duration>,
    /// The share of the idle timeout that must pass before a load rewrites
    /// the expiry.
    pub(crate) touch_fraction: f64,
}

impl LoadPolicy {
    /// A policy under which loads only read.
    #[cfg(feature = "tower-sessions")]
    pub(crate) const READ_ONLY: Self = Self {
        idle: None,
        absolute: None,
        touch_fraction: 0.0,
    };

    /// The times a load starting at `now` uses.
    pub(crate) fn params(&self, now: OffsetDateTime) -> LoadParams {
        let absolute_secs = self.absolute.map(|d| d.as_secs_f64());
        match self.idle {
            Some(idle) => LoadParams {
                now,
                extend_to: now + idle,
                // The row is rewritten only once this share of the idle timeout
                // has passed since the last write, not on every read.
                touch_before: now + idle.mul_f64(1.0 - self.touch_fraction),
                absolute_secs,
            },
            None => LoadParams {
                now,
                extend_to: now,
                touch_before: now,
                absolute_secs,
            },
        }
    }
}

/// Work that requests hand to a [`Batcher`].
pub(crate) trait Job: Send + Sized + 'static {
    type Output: Send + 'static;
    /// Jobs share a statement only when their groups are equal.
    type Group: PartialEq + Copy;
    /// Statements that start at once, without waiting for [`STALL`].
    const EAGER: usize = EAGER;
    /// Jobs in one statement from which requests count as many.
    const CROWD: usize = CROWD;
    fn group(&self) -> Self::Group;
    fn batcher(store: &PgStore) -> &Batcher<Self>;
    /// Runs the jobs and answers every one of them.
    fn execute(store: &PgStore, batch: Vec<Pending<Self>>) -> impl Future<Output = ()> + Send;
}

type Reply<J> = Result<<J as Job>::Output, Arc<StoreError>>;

/// A job and where its answer goes.
pub(crate) struct Pending<J: Job> {
    job: J,
    reply: oneshot::Sender<Reply<J>>,
}

struct Queue<J: Job> {
    waiting: Vec<Pending<J>>,
    running: usize,
    /// When a statement last started or finished.
    progress: Instant,
    /// Jobs in the latest statement started from the queue.
    shared: usize,
}

/// The queue of jobs waiting for a slot.
pub(crate) struct Batcher<J: Job> {
    queue: Mutex<Queue<J>>,
    slots: usize,
    /// [`STALL`], but in tests.
    stall: Duration,
}

impl<J: Job> Batcher<J> {
    pub(crate) fn new(slots: usize) -> Self {
        Self {
            queue: Mutex::new(Queue {
                waiting: Vec::new(),
                running: 0,
                progress: Instant::now(),
                shared: 0,
            }),
            slots: slots.max(1),
            stall: STALL,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue<J>> {
        // The queue is consistent between statements: a panic elsewhere
        // while it was held leaves nothing half-done.
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl PgStore {
    /// Runs `job` in a statement shared with the jobs of other requests
    /// running at the same time.
    async fn submit<J: Job>(&self, job: J) -> Result<J::Output, StoreError> {
        let (reply, answer) = oneshot::channel();
        let pending = Pending { job, reply };
        let start = {
            let batcher = J::batcher(self);
            let mut queue = batcher.lock();
            let now = Instant::now();
            if queue.running == 0 && queue.waiting.is_empty() {
                // Alone: run in this request's own future, no task hop. The
                // slot is taken all the same, so that jobs arriving meanwhile
                // queue to share the next statement.
                queue.running += 1;
                queue.progress = now;
                Start::Here(pending)
            } else {
                queue.waiting.push(pending);
                let eager = queue.running < J::EAGER.min(batcher.slots) && queue.shared < J::CROWD;
                let free = eager
                    || (queue.running < batcher.slots && now - queue.progress >= batcher.stall);
                if free {
                    queue.running += 1;
                    queue.progress = now;
                    let mut batch = queue.take();
                    if batch.len() == 1 && queue.waiting.is_empty() {
                        // Nothing else was queued: its own, run as a lone job is.
                        Start::Here(batch.swap_remove(0))
                    } else {
                        Start::Task(batch)
                    }
                } else {
                    Start::Queued
                }
            }
        };
        match start {
            Start::Here(pending) => {
                // Released when done, or when this request is dropped
                // mid-statement: either way what queued meanwhile gets a task.
                let _slot = Slot::<J>::new(self.clone());
                J::execute(self, vec![pending]).await;
            }
            // Its own task: the statement completes for every request in it
            // even when the request that started it is dropped.
            Start::Task(batch) => drop(tokio::spawn(run(self.clone(), batch))),
            Start::Queued => {}
        }
        match answer.await {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(shared)) => Err(Arc::try_unwrap(shared).unwrap_or_else(StoreError::Shared)),
            // The task ended without answering: it panicked.
            Err(_) => Err(StoreError::Database(sqlx::Error::WorkerCrashed)),
        }
    }

    /// Loads the live row under `key`, in a statement shared with the loads
    /// of other requests running at the same time.
    pub(crate) async fn load_shared(
        &self,
        key: String,
        policy: LoadPolicy,
    ) -> Result<Option<Loaded>, StoreError> {
        self.submit(LoadJob { key, policy }).await
    }

    /// Creates a row under `key` unless the id is taken, in a statement
    /// shared with the inserts of other requests. `None` when taken: the
    /// caller picks another id.
    pub(crate) async fn insert_shared(
        &self,
        key: &str,
        row: &NewRow<'_>,
        now: OffsetDateTime,
    ) -> Result<Option<String>, StoreError> {
        self.submit(InsertJob {
            key: key.to_owned(),
            row: OwnedRow::from_new(row),
            user_agent: row.user_agent.map(str::to_owned),
            ip: row.ip.map(str::to_owned),
            now,
        })
        .await
    }

    /// Writes a row loaded as `version` (same key), in a statement shared
    /// with the saves of other requests. `None` when the row changed, went
    /// away or is locked elsewhere: the caller takes the conflict path.
    pub(crate) async fn update_shared(
        &self,
        key: &str,
        version: &str,
        row: &NewRow<'_>,
        now: OffsetDateTime,
    ) -> Result<Option<String>, StoreError> {
        self.submit(UpdateJob {
            key: key.to_owned(),
            version: version.to_owned(),
            row: OwnedRow::from_new(row),
            now,
        })
        .await
    }
}

/// Where a submitted job runs.
enum Start<J: Job> {
    /// In the submitting request's future: nothing else queued or running.
    Here(Pending<J>),
    /// In a new task, with what else was queued.
    Task(Vec<Pending<J>>),
    /// In a slot already running, which takes it next.
    Queued,
}

impl<J: Job> Queue<J> {
    /// The next statement's jobs ([`take_batch`]), counted in `shared`.
    fn take(&mut self) -> Vec<Pending<J>> {
        let batch = take_batch(&mut self.waiting);
        self.shared = batch.len();
        batch
    }
}

/// The first job's group decides; other groups stay queued. Jobs whose
/// request stopped waiting (its time for database waits ran out, or it was
/// dropped) are left out: no statement writes for a request that has
/// already answered.
fn take_batch<J: Job>(waiting: &mut Vec<Pending<J>>) -> Vec<Pending<J>> {
    waiting.retain(|w| !w.reply.is_closed());
    let Some(first) = waiting.first() else {
        return Vec::new();
    };
    let group = first.job.group();
    if waiting.len() <= MAX_KEYS && waiting.iter().all(|w| w.job.group() == group) {
        return std::mem::take(waiting);
    }
    let (mut batch, mut rest) = (Vec::new(), Vec::new());
    for w in waiting.drain(..) {
        if batch.len() < MAX_KEYS && w.job.group() == group {
            batch.push(w);
        } else {
            rest.push(w);
        }
    }
    *waiting = rest;
    batch
}

/// Runs batches in one slot until the queue is empty, or until requests
/// are many ([`CROWD`]) and another slot runs, which takes what is queued
/// when its statement finishes.
async fn run<J: Job>(store: PgStore, mut batch: Vec<Pending<J>>) {
    let mut slot = Slot::<J>::new(store.clone());
    loop {
        let ran = batch.len();
        J::execute(&store, batch).await;
        let mut queue = J::batcher(&store).lock();
        queue.progress = Instant::now();
        if queue.waiting.is_empty() || (queue.running > 1 && ran >= J::CROWD) {
            // Released under the lock that a new job checks: nothing queued
            // from here on is left without a slot to run it.
            queue.running -= 1;
            slot.armed = false;
            return;
        }
        batch = queue.take();
    }
}

/// Frees the slot if the task unwinds, and hands what is queued to a new task.
struct Slot<J: Job> {
    store: PgStore,
    armed: bool,
    job: std::marker::PhantomData<fn() -> J>,
}

impl<J: Job> Slot<J> {
    fn new(store: PgStore) -> Self {
        Self {
            store,
            armed: true,
            job: std::marker::PhantomData,
        }
    }
}

impl<J: Job> Drop for Slot<J> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut queue = J::batcher(&self.store).lock();
        queue.progress = Instant::now();
        if queue.waiting.is_empty() {
            queue.running -= 1;
        } else {
            let batch = queue.take();
            tokio::spawn(run(self.store.clone(), batch));
        }
    }
}

/// Answers every job of a failed batch; the last takes the error itself, so
/// a request alone in its statement gets it unwrapped.
fn fail_all<J: Job>(batch: Vec<Pending<J>>, error: StoreError) {
    let last = batch.len().saturating_sub(1);
    let mut error = Some(Arc::new(error));
    for (i, w) in batch.into_iter().enumerate() {
        let shared = if i == last {
            error.take()
        } else {
            error.clone()
        };
        if let Some(shared) = shared {
            let _ = w.reply.send(Err(shared));
        }
    }
}

/// A load of one session.
pub(crate) struct LoadJob {
    key: String,
    policy: LoadPolicy,
}

impl Job for LoadJob {
    type Output = Option<Loaded>;
    type Group = LoadPolicy;

    fn group(&self) -> LoadPolicy {
        self.policy
    }

    fn batcher(store: &PgStore) -> &Batcher<Self> {
        &store.inner.loads
    }

    async fn execute(store: &PgStore, batch: Vec<Pending<Self>>) {
        let Some(first) = batch.first() else {
            return;
        };
        let params = first.job.policy.params(OffsetDateTime::now_utc());
        let mut keys: Vec<&str> = batch.iter().map(|w| w.job.key.as_str()).collect();
        keys.sort_unstable();
        keys.dedup();
        let distinct = keys.len() == batch.len();
        // One key: the plain statement; the shared shape only when there is
        // something to share.
        let load = || async {
            match keys.as_slice() {
                [key] => Ok(store
                    .load_one(key, &params)
                    .await?
                    .map(|row| vec![((*key).to_owned(), row)])
                    .unwrap_or_default()),
                _ => store.load_shared_rows(&keys, &params).await,
            }
        };
        // A pooled connection that died while idle fails its next statement;
        // that must not fail every request sharing it. Loads are safe to
        // repeat (a touch already written is not due again).
        let result = store.retry_once(load).await;
        let rows = match result {
            Ok(rows) => rows,
            Err(e) => return fail_all(batch, e),
        };
        let mut rows: HashMap<String, Loaded> = rows.into_iter().collect();
        let last = batch.len() - 1;
        for (i, w) in batch.into_iter().enumerate() {
            // Requests with the same cookie share the row.
            let row = if distinct || i == last {
                rows.remove(&w.job.key)
            } else {
                rows.get(&w.job.key).cloned()
            };
            let _ = w.reply.send(Ok(row));
        }
    }
}

/// A save of a loaded row under its own key.
pub(crate) struct UpdateJob {
    pub(crate) key: String,
    pub(crate) version: String,
    pub(crate) row: OwnedRow,
    pub(crate) now: OffsetDateTime,
}

impl Job for UpdateJob {
    type Output = Option<String>;
    type Group = ();
    const EAGER: usize = WRITES_EAGER;
    const CROWD: usize = WRITES_CROWD;

    fn group(&self) {}

    fn batcher(store: &PgStore) -> &Batcher<Self> {
        &store.inner.updates
    }

    async fn execute(store: &PgStore, batch: Vec<Pending<Self>>) {
        // One write per row in a statement; a second save of the same row
        // (two requests of one session) conflicts, and takes the locked
        // path after this statement has written the first.
        let batch = first_of_each_key(batch);
        if batch.is_empty() {
            return;
        }
        // Safe to repeat on a broken connection: a row the first attempt
        // wrote after all is at a new version, so the second skips it and
        // its request takes the conflict path, which re-applies the same
        // changes.
        let result = store
            .retry_once(|| async {
                match batch.as_slice() {
                    // Alone: the plain statement, which waits for a row lock
                    // (within the bound) rather than skipping the row.
                    [one] => {
                        let j = &one.job;
                        store
                            .update(&j.key, &j.key, &j.version, &j.row.borrowed(), j.now)
                            .await
                            .map(|v| v.map(|v| vec![(j.key.clone(), v)]).unwrap_or_default())
                    }
                    many => {
                        let jobs: Vec<&UpdateJob> = many.iter().map(|w| &w.job).collect();
                        store.update_many(&jobs).await
                    }
                }
            })
            .await;
        reply_versions(batch, result);
    }
}

/// A write of one row, named by its key, that answers with the row's new
/// version (`None`: not written).
trait RowWrite: Job<Output = Option<String>> {
    fn key(&self) -> &str;
}

impl RowWrite for UpdateJob {
    fn key(&self) -> &str {
        &self.key
    }
}

impl RowWrite for InsertJob {
    fn key(&self) -> &str {
        &self.key
    }
}

/// The batch with one write per key: a repeat is answered `None` at once
/// and takes its own path (the conflict path, or another id).
fn first_of_each_key<J: RowWrite>(batch: Vec<Pending<J>>) -> Vec<Pending<J>> {
    let mut seen = HashSet::new();
    let (batch, repeats): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .partition(|w| seen.insert(w.job.key().to_owned()));
    for w in repeats {
        let _ = w.reply.send(Ok(None));
    }
    batch
}

/// Answers each write with its row's new version (`None` when the
/// statement did not write it), or every write with the error.
fn reply_versions<J: RowWrite>(
    batch: Vec<Pending<J>>,
    result: Result<Vec<(String, String)>, StoreError>,
) {
    let versions: HashMap<String, String> = match result {
        Ok(rows) => rows.into_iter().collect(),
        Err(e) => return fail_all(batch, e),
    };
    for w in batch {
        let _ = w.reply.send(Ok(versions.get(w.job.key()).cloned()));
    }
}

/// An insert of a new session's row.
pub(crate) struct InsertJob {
    pub(crate) key: String,
    pub(crate) row: OwnedRow,
    /// Recorded at creation only.
    pub(crate) user_agent: Option<String>,
    pub(crate) ip: Option<String>,
    pub(crate) now: OffsetDateTime,
}

impl Job for InsertJob {
    type Output = Option<String>;
    type Group = ();
    const EAGER: usize = WRITES_EAGER;
    const CROWD: usize = WRITES_CROWD;

    fn group(&self) {}

    fn batcher(store: &PgStore) -> &Batcher<Self> {
        &store.inner.inserts
    }

    async fn execute(store: &PgStore, batch: Vec<Pending<Self>>) {
        // Two requests drawing one id: the first keeps it, the second finds
        // it taken and draws another, as against a row already stored.
        let batch = first_of_each_key(batch);
        let result = match batch.as_slice() {
            [] => return,
            // Alone: the plain statement (which retries a broken connection).
            [one] => {
                let j = &one.job;
                let row = NewRow {
                    user_agent: j.user_agent.as_deref(),
                    ip: j.ip.as_deref(),
                    ..j.row.borrowed()
                };
                store
                    .insert(&j.key, &row, j.now)
                    .await
                    .map(|v| v.map(|v| vec![(j.key.clone(), v)]).unwrap_or_default())
            }
            // Safe to repeat: rows the first attempt wrote after all are
            // taken for the second, and their requests draw other ids (the
            // first rows, which no cookie names, expire unused).
            many => {
                let jobs: Vec<&InsertJob> = many.iter().map(|w| &w.job).collect();
                store.retry_once(|| store.insert_many(&jobs)).await
            }
        };
        reply_versions(batch, result);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    //! The scheduling of shared statements, with a job that records each
    //! statement's jobs and finishes it only when the test lets it.

    use std::sync::LazyLock;

    use tokio::sync::Semaphore;

    use super::*;

    /// Statements so far, each as the ids of its jobs.
    static STARTED: Mutex<Vec<Vec<usize>>> = Mutex::new(Vec::new());
    /// One permit finishes one statement, in the order they started.
    static FINISH: Semaphore = Semaphore::const_new(0);
    /// Two slots, so that only a stall opens the second under a crowd; a
    /// stall long enough that no pause of a loaded machine passes for one.
    static BATCHER: LazyLock<Batcher<Probe>> = LazyLock::new(|| Batcher {
        stall: STALL_HERE,
        ..Batcher::new(2)
    });
    const STALL_HERE: Duration = Duration::from_millis(100);

    struct Probe(usize);

    impl Job for Probe {
        type Output = ();
        type Group = ();

        fn group(&self) {}

        fn batcher(_: &PgStore) -> &Batcher<Self> {
            &BATCHER
        }

        async fn execute(_: &PgStore, batch: Vec<Pending<Self>>) {
            let ids = batch.iter().map(|p| p.job.0).collect();
            STARTED.lock().unwrap().push(ids);
            FINISH.acquire().await.unwrap().forget();
            for p in batch {
                let _ = p.reply.send(Ok(()));
            }
        }
    }

    fn started() -> Vec<Vec<usize>> {
        STARTED.lock().unwrap().clone()
    }

    /// Lets spawned statements run up to their wait for [`FINISH`].
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    /// Submits jobs `ids` from tasks of their own, each answered once.
    fn submit(store: &PgStore, ids: std::ops::Range<usize>) -> Vec<tokio::task::JoinHandle<()>> {
        ids.map(|id| {
            let store = store.clone();
            tokio::spawn(async move { store.submit(Probe(id)).await.unwrap() })
        })
        .collect()
    }

    #[tokio::test]
    async fn once_statements_carry_many_jobs_one_runs_at_a_time() {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(10)
            .connect_lazy("postgres://127.0.0.1:9/none")
            .unwrap();
        let store = PgStore::build(pool, super::super::PgStoreConfig::new(), None);
        let mut jobs = submit(&store, 0..1);

        // Few jobs per statement: a second one starts beside the first at
        // once; the jobs after it queue.
        settle().await;
        jobs.extend(submit(&store, 1..8));
        settle().await;
        assert_eq!(started(), [vec![0], vec![1]]);

        // The queue goes in one statement of many jobs. A job arriving
        // while it runs queues too.
        FINISH.add_permits(2);
        jobs.extend(submit(&store, 8..9));
        settle().await;
        assert_eq!(started().len(), 3, "{:?}", started());
        assert_eq!(started()[2][..6], [2, 3, 4, 5, 6, 7]);

        // A statement that stalls lets a job open another slot. Then two
        // run, one of them crowded: that one, once done, leaves the queue
        // to the other instead of starting a statement beside it.
        tokio::time::sleep(STALL_HERE * 2).await;
        jobs.extend(submit(&store, 9..13));
        settle().await;
        assert_eq!(started().len(), 4, "a stall opens a slot: {:?}", started());
        let opened = started()[3].clone();
        assert_eq!(opened.last(), Some(&9));
        FINISH.add_permits(1);
        settle().await;
        assert_eq!(started().len(), 4, "the crowded slot left the queue");
        FINISH.add_permits(1);
        settle().await;
        assert_eq!(started()[4], [10, 11, 12]);
        FINISH.add_permits(1);
        for job in jobs {
            job.await.unwrap();
        }
    }
}
