//! The threads that own the SQLite connections.
//!
//! SQLite calls block, so none runs on an async worker thread. One writer
//! thread owns the only connection that writes: every append, snapshot write
//! and checkpoint runs there in turn, each in its own `BEGIN IMMEDIATE`
//! transaction, which makes the AUTOINCREMENT position commit-ordered without
//! any lock in Rust. A few reader threads each own a `query_only` connection;
//! in WAL mode they read a consistent snapshot beside the writer.
//!
//! Each reader has its own channel and an in-flight counter; a read goes to
//! the first reader with the fewest jobs in flight. That wakes exactly one
//! thread per read (a shared receiver behind a mutex wakes a second one to
//! take over the lock, which costs more than the query on a small machine),
//! and it keeps a quiet store's reads on the first connection, whose page
//! cache stays warm.
//!
//! Appends commit in groups. While the writer thread runs one transaction
//! (and waits for its fsync), other appends queue on its channel; when it
//! takes an append, it also takes the appends queued behind it (up to
//! [`MAX_GROUP`]), opens one `BEGIN IMMEDIATE` transaction, runs each append
//! in its own savepoint (an append that fails, on its expected version or a
//! bad event, rolls back its savepoint only and answers only its own
//! caller; an error that makes SQLite roll back the whole transaction, such
//! as a full disk, fails the appends run before it too, see
//! [`run_transaction`]), commits once and then answers everyone. So `k` waiting appends
//! cost one fsync instead of `k`, and each is still durable and atomic when
//! its call returns: nobody is answered before the commit, and a commit that
//! fails fails every append of the group. An append that finds nothing
//! queued is a group of one: the same transaction it always had, plus a
//! savepoint. Other writes (snapshots, checkpoints, migrations) run alone.
//!
//! Work travels as boxed closures over a channel; each closure answers on a
//! `tokio::sync::oneshot`, which an async caller awaits without blocking. When
//! the last handle (store clone or open read stream) is dropped, the channels
//! close and the threads end, closing their connections.
//!
//! A job that panics must not take its thread with it: a dead writer would
//! fail every later write, and a dead reader would keep receiving its share
//! of reads. So each job runs under `catch_unwind`: its caller gets an
//! [`annals::Error::Backend`] that says the job panicked and with what
//! message, a transaction the job left open is rolled back (nothing it wrote
//! stays), the reader's in-flight count is given back, and the thread takes
//! the next job. Unwinding drops the job's statements and rusqlite
//! transactions as it goes, so the connection is in a usable state after it.

use std::any::Any;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use annals::Result;
use futures::stream::{BoxStream, StreamExt};
use rusqlite::config::DbConfig;
use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::error::{classify, db, thread_stopped, ErrorKind};
use crate::migrate;

type WriteJob = Box<dyn FnOnce(&mut Connection) + Send>;
type ReadJob = Box<dyn FnOnce(&Connection) + Send>;

/// The most appends one group transaction takes. Bounded so that the first
/// caller of a long queue is answered after a bounded amount of work.
pub(crate) const MAX_GROUP: usize = 256;

/// A job on the writer thread.
enum WriterJob {
    /// Runs alone, in whatever transaction it opens itself.
    Solo(WriteJob),
    /// Runs in a savepoint inside a group transaction that the writer opens
    /// and commits.
    Member(Box<dyn GroupMember>),
}

/// One append of a group: it runs inside the group's transaction, and is
/// answered once the group's fate is known.
trait GroupMember: Send {
    /// Does the work (inside its own savepoint) and keeps the result.
    fn run(&mut self, conn: &mut Connection);
    /// Answers the caller: its own result if the group committed (or if its
    /// own work failed), else the group's failure.
    fn answer(self: Box<Self>, group: std::result::Result<(), &GroupFailure>);
}

/// Why a whole group failed (its transaction could not begin or commit);
/// every member whose own work succeeded gets it as its error.
struct GroupFailure {
    context: &'static str,
    error: rusqlite::Error,
}

impl GroupFailure {
    /// An error of its own for one member (driver errors are not `Clone`).
    fn to_error(&self) -> annals::Error {
        let copy = match &self.error {
            rusqlite::Error::SqliteFailure(code, message) => {
                rusqlite::Error::SqliteFailure(*code, message.clone())
            }
            other => rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
                Some(other.to_string()),
            ),
        };
        crate::error::map_err(self.context, copy)
    }
}

/// A group member for a closure `f` and its caller's reply channel.
struct Member<T, F> {
    f: Option<F>,
    schema_ok: Arc<AtomicBool>,
    result: Option<Result<T>>,
    reply: oneshot::Sender<Result<T>>,
}

impl<T, F> GroupMember for Member<T, F>
where
    T: Send + 'static,
    F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
{
    fn run(&mut self, conn: &mut Connection) {
        let Some(f) = self.f.take() else { return };
        let schema_ok = &self.schema_ok;
        // A panic unwinds through the member's savepoint, whose drop rolls
        // back what it wrote; the group's transaction stays open for the
        // others.
        let result = catch_unwind(AssertUnwindSafe(|| {
            ensure_schema(conn, schema_ok)?;
            f(conn)
        }))
        .unwrap_or_else(|payload| Err(panicked("writer", payload.as_ref(), String::new())));
        self.result = Some(result);
    }

    fn answer(self: Box<Self>, group: std::result::Result<(), &GroupFailure>) {
        let out = match (self.result, group) {
            (Some(Err(own)), _) => Err(own),
            (Some(Ok(value)), Ok(())) => Ok(value),
            (Some(Ok(_)) | None, Err(failure)) => Err(failure.to_error()),
            (None, Ok(())) => Err(thread_stopped("writer")),
        };
        let _ = self.reply.send(out);
    }
}

/// How long a connection waits for a lock held by another process.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Prepared statements kept per connection (the default, 16, is smaller
/// than the number of distinct statements the store runs).
const STATEMENT_CACHE: usize = 64;

/// One reader thread's queue.
struct Reader {
    jobs: mpsc::Sender<ReadJob>,
    /// Jobs sent and not yet finished.
    in_flight: Arc<AtomicUsize>,
}

/// Handles on the writer and reader threads. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Conns {
    writer: mpsc::Sender<WriterJob>,
    readers: Arc<[Reader]>,
    /// Group transactions the writer has run (committed or not; for the
    /// test hooks).
    groups: Arc<AtomicUsize>,
    /// Appends sent to the writer and not yet taken into a group. Counted
    /// once sent, so that a count of n means n are in the channel; the
    /// writer may take one before it is counted, hence signed.
    queued: Arc<AtomicIsize>,
    /// Set once the schema is known to be current; until then every job
    /// checks `annals_migrations` first (on its own thread).
    schema_ok: Arc<AtomicBool>,
    /// Raised by the writer after each group commit, before it answers the
    /// group (`EventStore::append_signal`).
    appended: Arc<tokio::sync::watch::Sender<u64>>,
    /// Writes sent to the writer whose callers are still waiting for their
    /// answer (see [`Reply`]: a read's caller hurries only while the store
    /// is idle).
    writing: Arc<AtomicUsize>,
}

/// Counts one write in [`Conns::writing`] while it lives: from before it is
/// sent until its caller has the answer or stops waiting for it.
struct Writing<'a>(&'a AtomicUsize);

impl<'a> Writing<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Writing(count)
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Conns {
    /// Starts the writer and `readers` reader threads, each with its own
    /// connection to `path`, and waits until all of them are open.
    pub(crate) async fn start(path: &Path, readers: usize) -> Result<Self> {
        let (writer_tx, writer_rx) = mpsc::channel::<WriterJob>();
        let (ready_tx, ready_rx) = oneshot::channel();
        let writer_path = path.to_owned();
        let groups = Arc::new(AtomicUsize::new(0));
        let queued = Arc::new(AtomicIsize::new(0));
        let writing = Arc::new(AtomicUsize::new(0));
        let counters = (Arc::clone(&groups), Arc::clone(&queued));
        let appended = Arc::new(tokio::sync::watch::Sender::new(0u64));
        let signal = Arc::clone(&appended);
        std::thread::Builder::new()
            .name("annals-sqlite-writer".into())
            .spawn(move || {
                let mut conn = match open_connection(&writer_path, Role::Writer) {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok(()));
                        c
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                writer_loop(&mut conn, &writer_rx, &counters.0, &counters.1, &signal);
            })
            .map_err(|e| spawn_failed("writer", e))?;
        ready_rx.await.map_err(|_| thread_stopped("writer"))??;

        // The writer has switched the file to WAL; readers open after it.
        let count = readers.max(1);
        let mut pool = Vec::with_capacity(count);
        let mut waiting = Vec::with_capacity(count);
        for i in 0..count {
            let (ready_tx, ready_rx) = oneshot::channel();
            let (jobs, rx) = mpsc::channel::<ReadJob>();
            let reader_path = path.to_owned();
            let reader_writing = Arc::clone(&writing);
            std::thread::Builder::new()
                .name(format!("annals-sqlite-reader-{i}"))
                .spawn(move || {
                    let conn = match open_connection(&reader_path, Role::Reader) {
                        Ok(c) => {
                            let _ = ready_tx.send(Ok(()));
                            c
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    // Only the first reader, the one an idle pool hands the
                    // next read (see `submit`), polls before it parks, and
                    // only while no write is waited for: back-to-back reads
                    // (a snapshot load after another, the pages of a
                    // replay) gain from it, while beside concurrent
                    // commands the poll took CPU the writer and the
                    // commands need.
                    let poll = if i == 0 {
                        POLL_BEFORE_PARK
                    } else {
                        std::time::Duration::ZERO
                    };
                    while let Some(job) = next_job(&rx, poll, Some(&reader_writing)) {
                        job(&conn);
                    }
                })
                .map_err(|e| spawn_failed("reader", e))?;
            pool.push(Reader {
                jobs,
                in_flight: Arc::new(AtomicUsize::new(0)),
            });
            waiting.push(ready_rx);
        }
        for ready in waiting {
            ready.await.map_err(|_| thread_stopped("reader"))??;
        }
        Ok(Conns {
            writer: writer_tx,
            readers: pool.into(),
            groups,
            queued,
            schema_ok: Arc::new(AtomicBool::new(false)),
            appended,
            writing,
        })
    }

    /// A receiver of the counter the writer raises after each group commit.
    pub(crate) fn append_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        self.appended.subscribe()
    }

    /// Runs `f` on the writer thread after checking the schema version.
    pub(crate) async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let schema_ok = Arc::clone(&self.schema_ok);
        self.write_unchecked(move |conn| {
            ensure_schema(conn, &schema_ok)?;
            f(conn)
        })
        .await
    }

    /// Runs `f` on the writer thread without the schema check (migrations).
    pub(crate) async fn write_unchecked<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let _writing = Writing::new(&self.writing);
        let (tx, rx) = oneshot::channel();
        let job: WriteJob = Box::new(move |conn| {
            let result = catch_unwind(AssertUnwindSafe(|| f(conn)))
                .unwrap_or_else(|payload| Err(job_panicked(conn, "writer", payload.as_ref())));
            let _ = tx.send(result);
        });
        self.writer
            .send(WriterJob::Solo(job))
            .map_err(|_| thread_stopped("writer"))?;
        rx.await.map_err(|_| thread_stopped("writer"))?
    }

    /// Runs `f` on the writer thread as a member of a group transaction
    /// (see the module docs), after checking the schema version. `f` runs
    /// inside a transaction the writer opened: it must do its writes in a
    /// savepoint of its own (`conn.savepoint()`), release it when it
    /// succeeds and roll it back (or drop it) when it fails, and never
    /// commit or roll back the enclosing transaction. The reply comes after
    /// the group committed.
    pub(crate) async fn write_in_group<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let _writing = Writing::new(&self.writing);
        let (tx, rx) = oneshot::channel();
        let member = Member {
            f: Some(f),
            schema_ok: Arc::clone(&self.schema_ok),
            result: None,
            reply: tx,
        };
        if self
            .writer
            .send(WriterJob::Member(Box::new(member)))
            .is_err()
        {
            return Err(thread_stopped("writer"));
        }
        self.queued.fetch_add(1, Ordering::Relaxed);
        rx.await.map_err(|_| thread_stopped("writer"))?
    }

    /// Group transactions committed so far, and appends queued for the
    /// writer and not yet taken (for the test hooks).
    pub(crate) fn group_counters(&self) -> (usize, usize) {
        (
            self.groups.load(Ordering::Relaxed),
            usize::try_from(self.queued.load(Ordering::Relaxed)).unwrap_or(0),
        )
    }

    /// Runs `f` on a reader thread after checking the schema version.
    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        wait(self.submit(f, true)).await
    }

    /// Sends `f` to a reader thread now; the receiver gets its result. With
    /// `hurry`, its caller waits without parking at first when the store is
    /// idle (see [`Reply`]).
    pub(crate) fn submit<T, F>(&self, f: F, hurry: bool) -> Result<Reply<T>>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.submit_to(None, f, hurry)
    }

    /// The first reader with the fewest jobs in flight (there is always
    /// one), and the jobs in flight on all of them (none: the store is idle
    /// unless a write is waited for).
    fn least_busy(&self) -> (Option<usize>, usize) {
        let mut busy = 0;
        let mut chosen: Option<(usize, usize)> = None;
        for (i, r) in self.readers.iter().enumerate() {
            let n = r.in_flight.load(Ordering::Relaxed);
            busy += n;
            if chosen.is_none_or(|(_, least)| n < least) {
                chosen = Some((i, n));
            }
        }
        (chosen.map(|(i, _)| i), busy)
    }

    /// [`submit`](Self::submit) to reader `on` (an index into the pool),
    /// or with `None` to the first reader with the fewest jobs in flight.
    fn submit_to<T, F>(&self, on: Option<usize>, f: F, hurry: bool) -> Result<Reply<T>>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let schema_ok = Arc::clone(&self.schema_ok);
        let (least, busy) = self.least_busy();
        let index = on
            .filter(|&i| i < self.readers.len())
            .or(least)
            .ok_or_else(|| thread_stopped("reader"))?;
        let reader = &self.readers[index];
        reader.in_flight.fetch_add(1, Ordering::Relaxed);
        let in_flight = Arc::clone(&reader.in_flight);
        let job: ReadJob = Box::new(move |conn| {
            let result = catch_unwind(AssertUnwindSafe(|| {
                ensure_schema(conn, &schema_ok).and_then(|()| f(conn))
            }))
            .unwrap_or_else(|payload| Err(job_panicked(conn, "reader", payload.as_ref())));
            // Before the reply: a caller that has its answer sees the count
            // already given back.
            in_flight.fetch_sub(1, Ordering::Relaxed);
            let _ = tx.send(result);
        });
        if reader.jobs.send(job).is_err() {
            reader.in_flight.fetch_sub(1, Ordering::Relaxed);
            return Err(thread_stopped("reader"));
        }
        Ok(Reply {
            rx,
            hurry_until: (hurry && busy == 0 && self.writing.load(Ordering::Relaxed) == 0)
                .then(|| std::time::Instant::now() + HURRY),
            yielding: None,
        })
    }

    /// The jobs sent to each reader and not yet finished, in reader order
    /// (for the test hook that checks the pool's accounting).
    pub(crate) fn reader_jobs_in_flight(&self) -> Vec<usize> {
        self.readers
            .iter()
            .map(|r| r.in_flight.load(Ordering::Relaxed))
            .collect()
    }

    /// Marks the schema as current (after `migrate`).
    pub(crate) fn set_schema_ok(&self) {
        self.schema_ok.store(true, Ordering::Release);
    }

    /// A lazy stream that fetches one page per reader round trip: `fetch`
    /// gets the cursor and returns the page and the next cursor (`None` when
    /// done). A page is anything that iterates into items; its items may be
    /// decoded as the stream is polled. The stream ends after its first
    /// error item (a row that does not decode, after the rows that did).
    ///
    /// Nothing is fetched until the stream is polled. After that it reads
    /// ahead: a reader thread fetches page `k + 1` while the caller consumes
    /// page `k`, and once the caller has taken page `k`, the job that
    /// fetched page `k + 1` sends the job for page `k + 2` to its own
    /// reader before it answers, so the reader goes on to it at once
    /// instead of waiting for the caller to wake up and ask (see
    /// [`PageJob`]). At most three pages are held (the one consumed, one
    /// read and one being read), so memory stays bounded by the batch size.
    pub(crate) fn paginate<T, P, C, F>(&self, cursor: C, fetch: F) -> BoxStream<'static, Result<T>>
    where
        T: Send + 'static,
        P: IntoIterator<Item = Result<T>> + Send + 'static,
        P::IntoIter: Send + Unpin,
        C: Send + Unpin + 'static,
        F: Fn(&Connection, C) -> Result<(P, Option<C>)> + Send + Sync + 'static,
    {
        Pages {
            conns: self.clone(),
            fetch: Arc::new(fetch),
            cursor: Some(cursor),
            pending: None,
            current: None,
            done: false,
            taken: Arc::new(AtomicUsize::new(0)),
        }
        .boxed()
    }

    /// [`Conns::paginate`] for a read whose first page is already here
    /// (fetched by a job that did more in the same round trip): yields
    /// `first`, then fetches the pages from `next` on (none when `None`),
    /// the first of them once `first` is consumed.
    pub(crate) fn paginate_after<T, P, C, F>(
        &self,
        first: P,
        next: Option<C>,
        fetch: F,
    ) -> BoxStream<'static, Result<T>>
    where
        T: Send + 'static,
        P: IntoIterator<Item = Result<T>> + Send + 'static,
        P::IntoIter: Send + Unpin,
        C: Send + Unpin + 'static,
        F: Fn(&Connection, C) -> Result<(P, Option<C>)> + Send + Sync + 'static,
    {
        Pages {
            conns: self.clone(),
            fetch: Arc::new(fetch),
            cursor: next,
            pending: None,
            current: Some(first.into_iter()),
            done: false,
            taken: Arc::new(AtomicUsize::new(1)),
        }
        .boxed()
    }
}

/// A reader's answer to a page request: the page and what follows it.
type PageReply<P, C> = Reply<(P, Next<P, C>)>;

/// What follows a page of [`Conns::paginate`].
enum Next<P, C> {
    /// It was the last one.
    Done,
    /// The cursor of the next page, for the caller to request once it has
    /// taken this one.
    Cursor(C),
    /// The next page, already requested by the job that read this one.
    Sent(Result<PageReply<P, C>>),
}

/// The job that reads page `index` of a [`Pages`] stream on reader
/// `reader`. When the caller has already taken the page before (`taken`,
/// the count of pages it has taken, is at least `index`), the job sends
/// the job of the next page to the same reader before it answers: that
/// reader then finds it queued and goes on at once, while the caller wakes
/// up. Otherwise the next cursor goes back with the page and the caller
/// requests it when it takes this one (from the least busy reader then),
/// so at most three pages are held.
struct PageJob<F, C> {
    conns: Conns,
    fetch: Arc<F>,
    cursor: C,
    index: usize,
    reader: usize,
    taken: Arc<AtomicUsize>,
}

impl<F, C> PageJob<F, C> {
    /// Sends this job to its reader.
    fn send<T, P>(self) -> Result<PageReply<P, C>>
    where
        T: Send + 'static,
        P: IntoIterator<Item = Result<T>> + Send + 'static,
        C: Send + 'static,
        F: Fn(&Connection, C) -> Result<(P, Option<C>)> + Send + Sync + 'static,
    {
        let conns = self.conns.clone();
        // Pages never hurry: a page is a longer read, and the next one is
        // read while this one is consumed, so its caller has work to do.
        conns.submit_to(Some(self.reader), move |conn| self.run(conn), false)
    }

    fn run<T, P>(self, conn: &Connection) -> Result<(P, Next<P, C>)>
    where
        T: Send + 'static,
        P: IntoIterator<Item = Result<T>> + Send + 'static,
        C: Send + 'static,
        F: Fn(&Connection, C) -> Result<(P, Option<C>)> + Send + Sync + 'static,
    {
        let PageJob {
            conns,
            fetch,
            cursor,
            index,
            reader,
            taken,
        } = self;
        let (page, next) = fetch(conn, cursor)?;
        let next = match next {
            None => Next::Done,
            Some(cursor) if taken.load(Ordering::Acquire) >= index => {
                let job = PageJob {
                    conns,
                    fetch,
                    cursor,
                    index: index + 1,
                    reader,
                    taken,
                };
                Next::Sent(job.send())
            }
            Some(cursor) => Next::Cursor(cursor),
        };
        Ok((page, next))
    }
}

/// The stream [`Conns::paginate`] returns.
///
/// Written out rather than composed from `unfold`, `flatten` and `scan`:
/// every combinator layer moves each item once more, and a
/// [`annals::RecordedEvent`] is a few hundred bytes, so on a long replay
/// those moves cost more than decoding the row.
struct Pages<P: IntoIterator, C, F> {
    conns: Conns,
    fetch: Arc<F>,
    /// The first page's cursor, until the stream is first polled.
    cursor: Option<C>,
    /// The page requested from a reader and not yet consumed.
    pending: Option<Result<PageReply<P, C>>>,
    /// The page being yielded.
    current: Option<P::IntoIter>,
    /// After the last page, or after the first error.
    done: bool,
    /// Pages the caller has taken (see [`PageJob`]).
    taken: Arc<AtomicUsize>,
}

impl<T, P, C, F> Pages<P, C, F>
where
    T: Send + 'static,
    P: IntoIterator<Item = Result<T>> + Send + 'static,
    C: Send + 'static,
    F: Fn(&Connection, C) -> Result<(P, Option<C>)> + Send + Sync + 'static,
{
    fn request(&mut self, cursor: C) {
        let job = PageJob {
            conns: self.conns.clone(),
            fetch: Arc::clone(&self.fetch),
            cursor,
            index: self.taken.load(Ordering::Relaxed),
            // The least busy reader now: a stream that paused (its caller
            // slower than its reads) does not come back to a reader that
            // another stream's pages keep busy meanwhile.
            reader: self.conns.least_busy().0.unwrap_or(0),
            taken: Arc::clone(&self.taken),
        };
        self.pending = Some(job.send());
    }
}

impl<T, P, C, F> futures::Stream for Pages<P, C, F>
where
    T: Send + 'static,
    P: IntoIterator<Item = Result<T>> + Send + 'static,
    P::IntoIter: Unpin,
    C: Send + Unpin + 'static,
    F: Fn(&Connection, C) -> Result<(P, Option<C>)> + Send + Sync + 'static,
{
    type Item = Result<T>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<T>>> {
        use std::task::Poll;
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(page) = &mut this.current {
                match page.next() {
                    Some(item) => {
                        if item.is_err() {
                            // Nothing is delivered past a hole: not the rest
                            // of this page, nor the page read ahead.
                            this.done = true;
                            this.current = None;
                            this.pending = None;
                        }
                        return Poll::Ready(Some(item));
                    }
                    None => this.current = None,
                }
            }
            if this.pending.is_none() {
                match this.cursor.take() {
                    Some(cursor) => this.request(cursor),
                    None => {
                        this.done = true;
                        return Poll::Ready(None);
                    }
                }
            }
            let reply = match this.pending.as_mut() {
                Some(Ok(reply)) => reply,
                Some(Err(_)) => {
                    this.done = true;
                    let Some(Err(e)) = this.pending.take() else {
                        return Poll::Ready(None);
                    };
                    return Poll::Ready(Some(Err(e)));
                }
                None => return Poll::Ready(None),
            };
            let answer = match std::pin::Pin::new(reply).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(answer) => answer,
            };
            this.pending = None;
            match answer.map_err(|_| thread_stopped("reader")).and_then(|r| r) {
                Ok((page, next)) => {
                    this.taken.fetch_add(1, Ordering::Release);
                    // Read ahead: the next page is fetched while this one is
                    // consumed.
                    match next {
                        Next::Done => {}
                        Next::Cursor(cursor) => this.request(cursor),
                        Next::Sent(reply) => this.pending = Some(reply),
                    }
                    this.current = Some(page.into_iter());
                }
                Err(e) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match (&self.current, self.done) {
            (_, true) => (0, Some(0)),
            (Some(page), false) => (page.size_hint().0, None),
            (None, false) => (0, None),
        }
    }
}

/// The answer to a job sent to a reader.
///
/// A point read ([`Conns::read`]: a snapshot and the events after it, a
/// head, a version) sent to an idle store is answered in a few
/// microseconds, less than it takes to wake a parked runtime worker (on
/// this project's 2-core VM, 4-25 µs against under 1 µs for a worker that
/// is still running). So the caller of such a job keeps its worker busy
/// while it waits, for at most [`HURRY`]: it yields to the runtime (other
/// tasks and the I/O driver run first) instead of parking, then looks
/// again. A job sent while other reads are in flight or writes are waited
/// for (a busy store, where the CPU is better left to the threads doing
/// that work: concurrent commands on SQLite lost throughput when their
/// loads hurried), and every page of a paginated read (longer, and read
/// while the page before is consumed: a replay lost throughput when its
/// pages hurried), waits the plain way from the start.
pub(crate) struct Reply<T> {
    rx: oneshot::Receiver<Result<T>>,
    /// Until when to yield rather than park; `None` once past it, for a job
    /// sent to a busy store, and for a page of a paginated read.
    hurry_until: Option<std::time::Instant>,
    /// The yield in progress.
    yielding: Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>>,
}

/// How long the caller of a point read sent to an idle store yields before
/// it parks (see [`Reply`]). About the longest a point read (a snapshot
/// and the events after it) takes; a longer job has the caller parked by
/// the time it ends.
const HURRY: std::time::Duration = std::time::Duration::from_micros(30);

impl<T> Future for Reply<T> {
    type Output = std::result::Result<Result<T>, oneshot::error::RecvError>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let this = self.get_mut();
        if let Some(yielding) = &mut this.yielding {
            if yielding.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.yielding = None;
        }
        if let Poll::Ready(answer) = std::pin::Pin::new(&mut this.rx).poll(cx) {
            return Poll::Ready(answer);
        }
        match this.hurry_until {
            Some(until) if std::time::Instant::now() < until => {
                let mut yielding = Box::pin(tokio::task::yield_now());
                // Its first poll schedules the task again and is pending.
                if yielding.as_mut().poll(cx).is_pending() {
                    this.yielding = Some(yielding);
                }
            }
            Some(_) => this.hurry_until = None,
            None => {}
        }
        Poll::Pending
    }
}

async fn wait<T>(reply: Result<Reply<T>>) -> Result<T> {
    reply?.await.map_err(|_| thread_stopped("reader"))?
}

/// The error a caller gets when its job panicked on the `which` thread.
///
/// Rolls back the transaction the job left open, if any: the connection
/// goes on serving other jobs, and it must not commit half of this one's
/// work with the next (on the writer) or keep an old read snapshot (on a
/// reader). A job that used a rusqlite `Transaction` has already rolled back
/// while unwinding; one that ran `BEGIN` itself has not.
fn job_panicked(conn: &Connection, which: &str, payload: &(dyn Any + Send)) -> annals::Error {
    if conn.is_autocommit() {
        return panicked(which, payload, String::new());
    }
    match conn.execute_batch("ROLLBACK") {
        Ok(()) => panicked(which, payload, " (its transaction was rolled back)".into()),
        Err(e) => {
            let mut err = panicked(
                which,
                payload,
                "; rolling back its open transaction failed".into(),
            );
            if let annals::Error::Backend { source, .. } = &mut err {
                *source = Some(Box::new(e));
            }
            err
        }
    }
}

/// The error of a job that panicked on the `which` thread, with `note`
/// appended to its message.
fn panicked(which: &str, payload: &(dyn Any + Send), note: String) -> annals::Error {
    let what = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic with a non-string payload");
    annals::Error::Backend {
        backend: crate::error::BACKEND,
        message: format!("a job on the sqlite {which} thread panicked: {what}{note}"),
        source: None,
    }
}

/// The writer thread: runs solo jobs one at a time and appends in groups.
fn writer_loop(
    conn: &mut Connection,
    rx: &mpsc::Receiver<WriterJob>,
    groups: &AtomicUsize,
    queued: &AtomicIsize,
    appended: &tokio::sync::watch::Sender<u64>,
) {
    // A solo job met while gathering a group runs right after that group.
    let mut next: Option<WriterJob> = None;
    loop {
        let job = match next.take() {
            Some(job) => job,
            None => match next_job(rx, POLL_BEFORE_PARK, None) {
                Some(job) => job,
                None => return,
            },
        };
        match job {
            WriterJob::Solo(job) => job(conn),
            WriterJob::Member(first) => {
                let mut group = vec![first];
                while group.len() < MAX_GROUP {
                    match rx.try_recv() {
                        Ok(WriterJob::Member(m)) => group.push(m),
                        Ok(solo) => {
                            next = Some(solo);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                queued.fetch_sub(
                    isize::try_from(group.len()).unwrap_or(isize::MAX),
                    Ordering::Relaxed,
                );
                // Counted before its members are answered, so that a caller
                // who got its answer sees its group counted.
                groups.fetch_add(1, Ordering::Relaxed);
                run_group(conn, group, appended);
            }
        }
    }
}

/// One group: its members in one transaction (see [`run_transaction`]),
/// and the members after one whose error made SQLite roll the whole
/// transaction back in a transaction of their own.
fn run_group(
    conn: &mut Connection,
    group: Vec<Box<dyn GroupMember>>,
    appended: &tokio::sync::watch::Sender<u64>,
) {
    let mut pending = group;
    while !pending.is_empty() {
        pending = run_transaction(conn, pending, appended);
    }
}

/// One group transaction: begin, every member in turn, commit, raise the
/// append signal, answer. Returns the members it did not run.
///
/// Some errors (a full disk or database, an I/O error, out of memory) make
/// SQLite roll back the whole transaction, not only the statement or the
/// member's savepoint, and leave the connection in autocommit mode. The
/// members run so far lost their writes with it: they are answered with a
/// failure (the one whose error it was, with its own error). The members
/// after it are not run in autocommit mode, where each savepoint would
/// commit on its own while the group's `COMMIT` then failed and told its
/// caller otherwise; they are returned to run in a new transaction.
fn run_transaction(
    conn: &mut Connection,
    mut group: Vec<Box<dyn GroupMember>>,
    appended: &tokio::sync::watch::Sender<u64>,
) -> Vec<Box<dyn GroupMember>> {
    if let Err(error) = conn.execute_batch("BEGIN IMMEDIATE") {
        let failure = GroupFailure {
            context: "starting an append",
            error,
        };
        for member in group {
            member.answer(Err(&failure));
        }
        return Vec::new();
    }
    let mut ran = 0;
    while ran < group.len() {
        group[ran].run(conn);
        ran += 1;
        if conn.is_autocommit() {
            let rest = group.split_off(ran);
            let failure = GroupFailure {
                context: "an append of the same group failed and SQLite rolled back the \
                          whole transaction; nothing of this append was written",
                error: rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
                    None,
                ),
            };
            for member in group {
                member.answer(Err(&failure));
            }
            return rest;
        }
    }
    let outcome = conn.execute_batch("COMMIT").map_err(|error| {
        // Nothing of the group stays; the connection is ready for the next.
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        GroupFailure {
            context: "committing an append",
            error,
        }
    });
    if outcome.is_ok() {
        metrics::histogram!("annals_sqlite_group_commit_size").record(group.len() as f64);
        // Before anybody is answered: a caller whose append returned `Ok`
        // finds the signal raised. Every path that writes events (append,
        // append_many) is a group member, so this is the one place.
        appended.send_modify(|n| *n = n.wrapping_add(1));
    }
    for member in group {
        member.answer(outcome.as_ref().map(|_| ()));
    }
    Vec::new()
}

/// Checks the schema version once; after that it is a single atomic load.
fn ensure_schema(conn: &Connection, ok: &AtomicBool) -> Result<()> {
    if ok.load(Ordering::Acquire) {
        return Ok(());
    }
    let found = migrate::schema_version(conn)?;
    let expected = migrate::LATEST_VERSION;
    if found != expected {
        return Err(annals::Error::SchemaVersion { found, expected });
    }
    ok.store(true, Ordering::Release);
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Writer,
    Reader,
}

fn open_connection(path: &Path, role: Role) -> Result<Connection> {
    let conn = Connection::open(path).map_err(db("opening the database file"))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(db("setting busy_timeout"))?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    // Plan each statement once. Without this, SQLite (3.4x, with STAT4)
    // treats a bound `LIMIT ?` (and, after ANALYZE, bound range bounds) as
    // plan inputs and re-prepares the statement every time it is rebound,
    // which costs more than most of our queries.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .map_err(db("enabling the query planner stability guarantee"))?;
    if role == Role::Writer {
        // Persistent in the file: later connections (readers) inherit it.
        let mode = switch_to_wal(&conn)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(annals::Error::Config(format!(
                "cannot use WAL journal mode on {} (got {mode}); SQLite stores need a file on a local file system",
                path.display()
            )));
        }
    }
    conn.execute_batch(
        "PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;",
    )
    .map_err(db("setting connection pragmas"))?;
    if role == Role::Reader {
        conn.execute_batch("PRAGMA query_only = ON;")
            .map_err(db("setting connection pragmas"))?;
    }
    Ok(conn)
}

/// Puts the file in WAL mode. SQLite answers a journal-mode change that
/// races with another connection (two processes creating one file) with
/// `SQLITE_BUSY` at once, without its busy handler, so this waits and retries
/// up to the busy timeout itself. It runs on the writer thread, never on an
/// async worker.
#[allow(clippy::disallowed_methods)] // std::thread::sleep: see above
fn switch_to_wal(conn: &Connection) -> Result<String> {
    let started = std::time::Instant::now();
    loop {
        let mode = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get::<_, String>(0))
            .and_then(|mode| {
                if mode.eq_ignore_ascii_case("wal") {
                    Ok(mode)
                } else {
                    conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
                }
            });
        match mode {
            Err(e) if classify(&e) == ErrorKind::Busy && started.elapsed() < BUSY_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(2));
            }
            other => return other.map_err(db("switching to WAL")),
        }
    }
}

/// How long a connection thread keeps polling for the next job after
/// finishing one before it parks. Waking a parked thread costs tens of
/// microseconds on a virtual machine; a command's load and save arrive
/// back to back, so a short poll saves that wake-up on the hot path while an
/// idle store still sleeps. The poll yields the CPU between tries instead of
/// spinning: the caller this thread just answered may have been woken on the
/// same CPU (when the others are busy), and a spin kept it waiting for the
/// whole poll (W2's snapshot load: medians of 18-20 µs in five runs with
/// the yield, 19-44 µs without; issue 11). The writer and the first reader
/// poll, the reader only while no write is waited for; the other readers
/// park at once (see `Conns::start`).
const POLL_BEFORE_PARK: std::time::Duration = std::time::Duration::from_micros(50);

/// The next job, or `None` once every sender is gone, polling for up to
/// `poll` before it parks; with `writing`, it stops polling (and parks)
/// as soon as that count of writes waited for is not zero.
fn next_job<T>(
    rx: &mpsc::Receiver<T>,
    poll: std::time::Duration,
    writing: Option<&AtomicUsize>,
) -> Option<T> {
    let started = std::time::Instant::now();
    loop {
        match rx.try_recv() {
            Ok(job) => return Some(job),
            Err(mpsc::TryRecvError::Disconnected) => return None,
            Err(mpsc::TryRecvError::Empty)
                if started.elapsed() < poll
                    && writing.is_none_or(|w| w.load(Ordering::Relaxed) == 0) =>
            {
                std::thread::yield_now();
            }
            Err(mpsc::TryRecvError::Empty) => return rx.recv().ok(),
        }
    }
}

fn spawn_failed(which: &str, e: std::io::Error) -> annals::Error {
    annals::Error::Backend {
        backend: crate::error::BACKEND,
        message: format!("cannot start the sqlite {which} thread"),
        source: Some(Box::new(e)),
    }
}

/// The rows of one page, in the form the stream yields them: the rows that
/// decoded, then possibly the error that stopped the page.
pub(crate) struct Page<T> {
    items: Vec<Result<T>>,
    complete: bool,
}

impl<T> Page<T> {
    /// Decodes `rows`, stopping at the first row that does not decode, so a
    /// reader still gets every good row before a corrupt one. A driver error
    /// fails the whole page.
    pub(crate) fn collect(
        rows: &mut rusqlite::Rows<'_>,
        capacity: usize,
        context: &'static str,
        mut decode: impl FnMut(&rusqlite::Row<'_>) -> Result<T>,
    ) -> Result<Self> {
        let mut items = Vec::with_capacity(capacity);
        while let Some(row) = rows.next().map_err(db(context))? {
            let item = decode(row);
            let failed = item.is_err();
            items.push(item);
            if failed {
                return Ok(Page {
                    items,
                    complete: false,
                });
            }
        }
        Ok(Page {
            items,
            complete: true,
        })
    }

    /// Rows that decoded.
    pub(crate) fn len(&self) -> usize {
        self.items.len() - usize::from(!self.complete)
    }

    /// The last row that decoded, when every row did (the keyset cursor of
    /// the next page).
    pub(crate) fn last_if_complete(&self) -> Option<&T> {
        match self.items.last() {
            Some(Ok(last)) if self.complete => Some(last),
            _ => None,
        }
    }

    /// The page for [`Conns::paginate`]: a decode error ends the stream.
    pub(crate) fn finish<C>(self, next: Option<C>) -> (Vec<Result<T>>, Option<C>) {
        let next = if self.complete { next } else { None };
        (self.items, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(
        hurry_until: Option<std::time::Instant>,
    ) -> (oneshot::Sender<Result<u32>>, Reply<u32>) {
        let (tx, rx) = oneshot::channel();
        let reply = Reply {
            rx,
            hurry_until,
            yielding: None,
        };
        (tx, reply)
    }

    /// The threads of a store on a new file in `dir` with `readers`
    /// readers, for jobs that read no table (no migration needed).
    async fn started(dir: &tempfile::TempDir, readers: usize) -> Conns {
        let conns = Conns::start(&dir.path().join("test.db"), readers)
            .await
            .expect("the store's threads");
        conns.set_schema_ok();
        conns
    }

    /// Pages 0 to `last` of one item each, the page and the thread that
    /// read it; each fetch first says which page it starts on the
    /// receiver returned, and page 1 waits for a message on the sender.
    #[allow(clippy::type_complexity)]
    fn gated_pages(
        conns: &Conns,
        last: u32,
    ) -> (
        BoxStream<'static, Result<(u32, std::thread::ThreadId)>>,
        std::sync::mpsc::Receiver<u32>,
        std::sync::mpsc::Sender<()>,
    ) {
        use std::sync::Mutex;
        let (started_tx, started) = std::sync::mpsc::channel::<u32>();
        let (go, gate) = std::sync::mpsc::channel::<()>();
        let (started_tx, gate) = (Mutex::new(started_tx), Mutex::new(gate));
        let pages = conns.paginate(0u32, move |_, page: u32| {
            started_tx.lock().expect("lock").send(page).ok();
            if page == 1 {
                gate.lock().expect("lock").recv().ok();
            }
            let next = (page < last).then_some(page + 1);
            Ok((vec![Ok((page, std::thread::current().id()))], next))
        });
        (pages, started, go)
    }

    /// A reply answered while its caller yields, after its window, before
    /// it is first polled, or never: each resolves to what was sent (or
    /// to the closed channel), and a pending one wakes its task.
    #[tokio::test]
    async fn a_reply_resolves_in_and_after_its_hurry_window() {
        let far = std::time::Instant::now() + std::time::Duration::from_secs(3600);
        let past = std::time::Instant::now();
        for hurry_until in [Some(far), Some(past), None] {
            // Answered after a first poll found nothing.
            let (tx, mut pending) = reply(hurry_until);
            assert!(futures::poll!(&mut pending).is_pending());
            assert!(tx.send(Ok(7)).is_ok());
            assert_eq!(pending.await.ok().and_then(|r| r.ok()), Some(7));

            // Answered before the first poll.
            let (tx, ready) = reply(hurry_until);
            assert!(tx.send(Ok(8)).is_ok());
            assert_eq!(ready.await.ok().and_then(|r| r.ok()), Some(8));

            // Answered from another thread while the caller waits.
            let (tx, waiting) = reply(hurry_until);
            let sender = std::thread::spawn(move || tx.send(Ok(9)).is_ok());
            assert_eq!(waiting.await.ok().and_then(|r| r.ok()), Some(9));
            assert!(sender.join().unwrap_or(false));

            // The job's thread went away without answering.
            let (tx, orphan) = reply(hurry_until);
            drop(tx);
            assert!(orphan.await.is_err());
        }
    }

    /// A read hurries only when sent to an idle store: not while another
    /// read is in flight, nor while a write is waited for.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_a_read_sent_to_an_idle_store_hurries() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let conns = started(&dir, 2).await;
        let idle = conns.submit(|_| Ok(1), true).expect("a read");
        assert!(
            idle.hurry_until.is_some(),
            "an idle store's read did not hurry"
        );
        assert_eq!(idle.await.ok().and_then(|r| r.ok()), Some(1));

        // A write waited for.
        let writing = Writing::new(&conns.writing);
        let beside_write = conns.submit(|_| Ok(2), true).expect("a read");
        assert!(beside_write.hurry_until.is_none(), "hurried beside a write");
        assert_eq!(beside_write.await.ok().and_then(|r| r.ok()), Some(2));
        drop(writing);

        // Another read in flight (held on its reader until released).
        let (release, held) = std::sync::mpsc::channel::<()>();
        let first = conns
            .submit(
                move |_| {
                    held.recv().ok();
                    Ok(3)
                },
                true,
            )
            .expect("a read");
        let second = conns.submit(|_| Ok(4), true).expect("a read");
        assert!(second.hurry_until.is_none(), "hurried beside another read");
        assert_eq!(second.await.ok().and_then(|r| r.ok()), Some(4));
        release.send(()).expect("the held read is waiting");
        assert_eq!(first.await.ok().and_then(|r| r.ok()), Some(3));

        // Idle again once both are answered and the write is done.
        let again = conns.submit(|_| Ok(5), true).expect("a read");
        assert!(again.hurry_until.is_some(), "did not hurry once idle again");
        assert_eq!(again.await.ok().and_then(|r| r.ok()), Some(5));
    }

    /// Once the caller has taken page `k`, the job that reads page `k + 1`
    /// sends the job of page `k + 2` itself, so that page is read without
    /// the caller asking; and a caller that takes nothing more holds the
    /// reader back after three pages (one taken, two read).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_page_job_sends_the_next_one_once_the_caller_has_taken_the_page_before() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let conns = started(&dir, 1).await;
        let (pages, started, go) = gated_pages(&conns, 9);
        let mut pages = pages.map(|p| p.map(|(page, _)| page));
        let wait = |rx: &std::sync::mpsc::Receiver<u32>| {
            rx.recv_timeout(std::time::Duration::from_secs(30))
                .expect("a fetch started")
        };
        assert_eq!(pages.next().await.transpose().expect("page 0"), Some(0));
        assert_eq!(wait(&started), 0);
        // Page 1's job was sent by page 0's (nothing was taken before it)
        // and waits at the gate; page 0 is taken, so once let go it sends
        // page 2's job before it answers, and the caller asks for nothing.
        assert_eq!(wait(&started), 1);
        go.send(()).expect("page 1 waits");
        assert_eq!(wait(&started), 2);
        // Page 2's job found page 1 not taken: it sent nothing. A job
        // queued now runs after anything page 2's job could have sent.
        conns
            .read(|_| Ok(()))
            .await
            .expect("a read behind the pages");
        assert!(
            started.try_recv().is_err(),
            "page 3 was read before the caller took page 1"
        );
        let mut got = vec![0];
        while let Some(page) = pages.next().await {
            got.push(page.expect("a page"));
        }
        assert_eq!(got, (0..10).collect::<Vec<_>>());
    }

    /// A round trip the caller asks for goes to the least busy reader, not
    /// back to the reader of the stream's earlier round trips: a stream
    /// read on the first reader pauses (its caller takes nothing), a long
    /// job then holds that reader, and the stream, resumed, reads its next
    /// pages on the second reader instead of waiting behind the long job.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_resumed_stream_asks_the_least_busy_reader() {
        let patience = std::time::Duration::from_secs(30);
        let dir = tempfile::tempdir().expect("a temporary directory");
        let conns = started(&dir, 2).await;
        let (mut pages, started, go) = gated_pages(&conns, 5);
        let (first, first_reader) = pages.next().await.expect("a page").expect("page 0");
        assert_eq!(first, 0);
        // Page 1's job (sent by page 0's, on the same reader) ends after
        // page 0 was taken, so it sends page 2's; page 2's finds page 1 not
        // taken and sends nothing.
        go.send(()).expect("page 1 waits");
        for want in [0, 1, 2] {
            assert_eq!(started.recv_timeout(patience).expect("a fetch"), want);
        }
        // Queued behind page 2's job on the first reader, then held there.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (held_on_tx, held_on) = std::sync::mpsc::channel();
        let blocker = conns
            .submit_to(
                Some(0),
                move |_| {
                    held_on_tx.send(std::thread::current().id()).ok();
                    held.recv().ok();
                    Ok(())
                },
                false,
            )
            .expect("a job on the first reader");
        let blocked = held_on
            .recv_timeout(patience)
            .expect("the long job started");
        assert_eq!(
            blocked, first_reader,
            "the stream began on the first reader"
        );
        let rest: Vec<(u32, std::thread::ThreadId)> = tokio::time::timeout(
            patience,
            pages.map(|p| p.expect("a page")).collect::<Vec<_>>(),
        )
        .await
        .expect("the rest read while the first reader is held");
        assert_eq!(
            rest.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
            (1..6).collect::<Vec<_>>()
        );
        assert!(
            rest[2..].iter().all(|(_, t)| *t != blocked),
            "pages 3-5 waited for the held reader"
        );
        release.send(()).expect("the long job waits");
        assert!(blocker.await.is_ok());
    }

    /// A thread waiting for its next job gets every job sent, in order,
    /// whether it polls (no write waited for) or parks at once (a write
    /// waited for), and `None` once every sender is gone.
    #[test]
    fn next_job_takes_each_job_polling_or_parked() {
        let writing = AtomicUsize::new(0);
        for waited_for in [0, 1] {
            writing.store(waited_for, Ordering::Relaxed);
            let (tx, rx) = mpsc::channel::<u32>();
            let sender = std::thread::spawn(move || {
                for job in 1..=3 {
                    if tx.send(job).is_err() {
                        return false;
                    }
                }
                true
            });
            let got: Vec<_> = (0..3)
                .filter_map(|_| next_job(&rx, POLL_BEFORE_PARK, Some(&writing)))
                .collect();
            assert_eq!(got, [1, 2, 3], "with {waited_for} writes waited for");
            assert!(sender.join().unwrap_or(false));
            assert_eq!(next_job(&rx, POLL_BEFORE_PARK, Some(&writing)), None);
        }
    }

    /// Inside its window an unanswered reply yields (its task is scheduled
    /// again); once the window is past it stops yielding and parks until
    /// the answer wakes it.
    #[tokio::test]
    async fn a_reply_stops_hurrying_after_its_window() {
        let far = std::time::Instant::now() + std::time::Duration::from_secs(3600);
        let (tx, mut pending) = reply(Some(far));
        assert!(futures::poll!(&mut pending).is_pending());
        assert!(
            pending.yielding.is_some(),
            "did not yield inside its window"
        );
        pending.hurry_until = Some(std::time::Instant::now());
        // The yield in progress ends, then the window is found past.
        for _ in 0..2 {
            assert!(futures::poll!(&mut pending).is_pending());
        }
        assert!(pending.hurry_until.is_none() && pending.yielding.is_none());
        assert!(futures::poll!(&mut pending).is_pending());
        assert!(pending.yielding.is_none(), "yielded after its window");
        assert!(tx.send(Ok(1)).is_ok());
        assert_eq!(pending.await.ok().and_then(|r| r.ok()), Some(1));
    }
}
