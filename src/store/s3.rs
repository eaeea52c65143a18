//! The store on S3-compatible object storage (`--store s3://bucket/prefix`), through the
//! `object_store` crate and its usual `AWS_*` environment (`AWS_ENDPOINT_URL`, `AWS_REGION`,
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`, …). How the guarantees of the
//! store (see [`super`]) are kept here:
//!
//! - *Visible only complete*: an upload is buffered up to one part ([`PART_SIZE`]). What fits is
//!   sent as one `PutObject` when it is published; what does not becomes a multipart upload of a
//!   staging object `uploads/<random>`, completed only when the writer publishes (after its digest
//!   check), then copied to its key. No key the store reads exists before that.
//! - *Conditional create*: `PutObject` with `If-None-Match: *` (object_store's `PutMode::Create`).
//!   object_store 0.13 cannot complete one's own multipart upload conditionally, so a staged upload
//!   goes into place with its copy-if-not-exists in `multipart` mode: an `UploadPartCopy` whose
//!   `CompleteMultipartUpload` carries `If-None-Match: *`. The price is one server-side copy per
//!   blob over 8 MiB, and AWS copies at most 5 GiB in one part, so a larger blob fails to publish
//!   there (an error, never a wrong object).
//! - *Replace*: a plain put (or a plain copy of the staging object); S3 replaces an object whole.
//! - *Access time*: S3 cannot move an object's `Last-Modified` short of rewriting it, and a
//!   self-copy would rewrite a whole layer after every read of it. [`Backend::touch`] writes an
//!   empty marker `touched/<key>` instead, and [`Backend::stat`]'s `modified` is the later of the
//!   object's and its marker's `Last-Modified`. Those are the server's clock, which GC compares
//!   with the local one: the grace period must exceed the clocks' skew (NTP keeps it far below the
//!   default 600 s). `Last-Modified` has whole seconds, covered by GC's one-second slack.
//! - *Crashes*: a staging object left by a crash is removed by the next open once it is an hour old,
//!   as `tmp/` is on disk. The parts of an upload never completed are invisible and cost storage
//!   until the bucket's `AbortIncompleteMultipartUpload` lifecycle rule removes them (object_store
//!   cannot list them); a writer that is merely dropped aborts its upload itself.
//!
//! The [`Backend`] trait is synchronous and object_store is async. The backend owns a small tokio
//! runtime of its own; each call spawns its future there and waits for it with
//! `futures::executor::block_on`. `Handle::block_on` is never used, since it panics on a runtime
//! worker thread, and this way a call is safe from any thread: a blocking thread (the norm: the
//! conversion and the registry view call the store from `spawn_blocking`), a plain thread (tests),
//! or an async worker of the server's runtime, which a short call then blocks for one request (a
//! lease dropped in async code touches its blob), as a file system call would. Waiting on another
//! runtime's threads cannot deadlock the caller's runtime.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey, S3CopyIfNotExists};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{
    BackoffConfig, ClientConfigKey, GetOptions, GetRange, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMode, PutPayload, RetryConfig,
};
use tokio::task::JoinHandle;

use super::backend::{Backend, Meta, Upload, READY_TIMEOUT};
use super::fs::STALE_UPLOAD_AGE;

/// Bytes of one multipart part, and the most a single `PutObject` carries. S3 wants at least
/// 5 MiB per part but the last and allows 10,000 parts: objects up to 80 GB.
pub const PART_SIZE: usize = 8 << 20;
/// Parts uploading at once behind the one being filled: an upload holds at most three parts
/// (24 MiB) in memory, and the writer goes on while the network works.
const PARTS_IN_FLIGHT: usize = 2;
/// Where multipart uploads are staged before their conditional copy into place.
const UPLOADS: &str = "uploads/";
/// Where access markers live (see the module docs).
const TOUCHED: &str = "touched/";
/// How long a streaming object body may send nothing before its read fails.
const STREAM_IDLE: Duration = Duration::from_secs(60);
/// Chunks of a body read ahead of its reader.
const READ_AHEAD: usize = 8;

/// Where `--store s3://…` points: a bucket and a key prefix in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    /// `""` or `a/b/`: what every key of the store starts with.
    pub prefix: String,
}

impl S3Url {
    /// `s3://bucket[/prefix]`; `None` for anything else.
    pub fn parse(url: &str) -> Option<Result<S3Url, String>> {
        let rest = url.strip_prefix("s3://")?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        if bucket.is_empty() {
            return Some(Err(format!("{url}: no bucket (s3://BUCKET[/PREFIX])")));
        }
        if !prefix.is_empty() && !prefix.split('/').all(plain_component) {
            return Some(Err(format!(
                "{url}: the prefix must be plain path components"
            )));
        }
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        };
        Some(Ok(S3Url {
            bucket: bucket.to_string(),
            prefix,
        }))
    }
}

impl std::fmt::Display for S3Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

fn plain_component(c: &str) -> bool {
    !c.is_empty() && c != "." && c != ".."
}

fn io_err(e: object_store::Error) -> io::Error {
    match e {
        object_store::Error::NotFound { .. } => io::Error::new(io::ErrorKind::NotFound, e),
        e => io::Error::other(e),
    }
}

struct Inner {
    store: Arc<dyn ObjectStore>,
    /// The same client, typed: what presigns URLs (`--blob-redirect`).
    signer: AmazonS3,
    /// The same bucket without the whole-request timeout: a body streams for as long as its reader
    /// takes (a slow client), bounded per chunk by [`STREAM_IDLE`] instead.
    streams: Arc<dyn ObjectStore>,
    prefix: String,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Inner {
    fn path(&self, key: &str) -> Path {
        // Keys are made by the store from validated names; this is the last line of defence.
        assert!(
            key.split('/').all(plain_component),
            "store key {key:?} is not a plain relative path"
        );
        Path::from(format!("{}{key}", self.prefix))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.runtime.as_ref().expect("runtime until drop").handle()
    }

    /// Runs `fut` on the backend's runtime and waits for it, from any thread (see the module docs).
    fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = io::Result<T>> + Send + 'static,
    ) -> io::Result<T> {
        join(self.handle().spawn(fut))
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // A plain drop of a runtime panics in async code, where the last store handle may go.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn join<T>(task: JoinHandle<io::Result<T>>) -> io::Result<T> {
    match futures::executor::block_on(task) {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(io::Error::other("the store's runtime is shutting down")),
    }
}

async fn head(store: &dyn ObjectStore, path: &Path) -> io::Result<Option<ObjectMeta>> {
    match store.head(path).await {
        Ok(m) => Ok(Some(m)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(io_err(e)),
    }
}

/// The store's objects in one bucket, under one prefix.
pub struct S3Backend {
    inner: Arc<Inner>,
    url: S3Url,
}

impl S3Backend {
    /// Connects to the bucket (failing if it cannot be listed: a wrong name, endpoint or
    /// credentials stop strata at start-up) and removes stale staging objects of crashed writers.
    pub fn open(url: &S3Url) -> io::Result<S3Backend> {
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(&url.bucket);
        if builder
            .get_config_value(&AmazonS3ConfigKey::CopyIfNotExists)
            .is_none()
        {
            builder = builder.with_copy_if_not_exists(S3CopyIfNotExists::Multipart);
        }
        // Few retries: an unreachable store should fail a request (and start-up) in seconds, not
        // object_store's default three minutes.
        builder = builder.with_retry(RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: 3,
            retry_timeout: Duration::from_secs(30),
        });
        let streams = builder
            .clone()
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                "24h".to_string(),
            )
            .build()
            .map_err(io::Error::other)?;
        let store = builder.build().map_err(io::Error::other)?;
        let signer = store.clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("strata-s3")
            .enable_all()
            .build()?;
        let backend = S3Backend {
            inner: Arc::new(Inner {
                store: Arc::new(store),
                signer,
                streams: Arc::new(streams),
                prefix: url.prefix.clone(),
                runtime: Some(runtime),
            }),
            url: url.clone(),
        };
        backend.remove_stale_uploads(STALE_UPLOAD_AGE)?;
        Ok(backend)
    }

    pub fn url(&self) -> &S3Url {
        &self.url
    }

    /// Removes the staging objects last written `older_than` ago or earlier (left by writers that
    /// died between completing one and copying it into place); how many.
    pub fn remove_stale_uploads(&self, older_than: Duration) -> io::Result<usize> {
        let store = self.inner.store.clone();
        let dir = self.inner.path(UPLOADS.trim_end_matches('/'));
        self.inner.run(async move {
            let stale = SystemTime::now() - older_than;
            let old: Vec<Path> = store
                .list(Some(&dir))
                .try_filter(|m| futures::future::ready(SystemTime::from(m.last_modified) < stale))
                .map_ok(|m| m.location)
                .try_collect()
                .await
                .map_err(io_err)?;
            for p in &old {
                match store.delete(p).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(io_err(e)),
                }
            }
            Ok(old.len())
        })
    }
}

impl Backend for S3Backend {
    fn upload(&self) -> io::Result<Box<dyn Upload>> {
        Ok(Box::new(S3Upload {
            inner: self.inner.clone(),
            buf: Vec::new(),
            staged: None,
        }))
    }

    fn get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
    ) -> io::Result<Option<Box<dyn Read + Send>>> {
        if range.as_ref().is_some_and(|r| r.start >= r.end) {
            // S3 has no empty range (`bytes=5-4` is refused).
            let empty = Box::new(io::empty()) as Box<dyn Read + Send>;
            return Ok(self.stat(key)?.map(|_| empty));
        }
        let (streams, path) = (self.inner.streams.clone(), self.inner.path(key));
        let rx = self.inner.run(async move {
            let opts = GetOptions {
                range: range.map(GetRange::Bounded),
                ..Default::default()
            };
            let body = match streams.get_opts(&path, opts).await {
                Ok(r) => r.into_stream(),
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(io_err(e)),
            };
            let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD);
            tokio::spawn(pump(body, tx));
            Ok(Some(rx))
        })?;
        Ok(rx.map(|rx| {
            Box::new(BodyReader {
                rx,
                chunk: Bytes::new(),
            }) as Box<dyn Read + Send>
        }))
    }

    fn stat(&self, key: &str) -> io::Result<Option<Meta>> {
        let store = self.inner.store.clone();
        let (object, marker) = (
            self.inner.path(key),
            self.inner.path(&format!("{TOUCHED}{key}")),
        );
        self.inner.run(async move {
            let (o, m) = futures::join!(head(&*store, &object), head(&*store, &marker));
            let Some(o) = o? else { return Ok(None) };
            let modified = match m? {
                Some(m) => m.last_modified.max(o.last_modified),
                None => o.last_modified,
            };
            Ok(Some(Meta {
                size: o.size,
                modified: modified.into(),
            }))
        })
    }

    fn delete(&self, key: &str) -> io::Result<bool> {
        let store = self.inner.store.clone();
        let (object, marker) = (
            self.inner.path(key),
            self.inner.path(&format!("{TOUCHED}{key}")),
        );
        self.inner.run(async move {
            // S3 answers a DELETE alike whether or not the object was there.
            let existed = head(&*store, &object).await?.is_some();
            if existed {
                store.delete(&object).await.map_err(io_err)?;
            }
            // The marker after its object: a marker alone is never read.
            match store.delete(&marker).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(existed),
                Err(e) => Err(io_err(e)),
            }
        })
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        let store = self.inner.store.clone();
        let dir = self.inner.path(prefix.trim_end_matches('/'));
        let ours = self.inner.prefix.clone();
        self.inner.run(async move {
            let mut keys: Vec<String> = store
                .list(Some(&dir))
                .map_ok(|m| m.location.to_string())
                .try_collect()
                .await
                .map_err(io_err)?;
            keys.retain_mut(|k| match k.strip_prefix(&ours) {
                Some(rest) => {
                    *k = rest.to_string();
                    true
                }
                None => false,
            });
            keys.sort();
            Ok(keys)
        })
    }

    /// One listing of the prefix's top level (a missing bucket fails it; a missing key would not).
    fn ready(&self) -> io::Result<()> {
        let store = self.inner.store.clone();
        let prefix = self.inner.prefix.trim_end_matches('/');
        let dir = (!prefix.is_empty()).then(|| Path::from(prefix));
        self.inner.run(async move {
            let listing = store.list_with_delimiter(dir.as_ref());
            let listed = tokio::time::timeout(READY_TIMEOUT, listing);
            match listed.await {
                Ok(r) => r.map(drop).map_err(io_err),
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time")),
            }
        })
    }

    fn touch(&self, key: &str) -> io::Result<()> {
        let store = self.inner.store.clone();
        let (object, marker) = (
            self.inner.path(key),
            self.inner.path(&format!("{TOUCHED}{key}")),
        );
        self.inner.run(async move {
            // No marker for what is not there: requests for unknown digests would leave litter.
            if head(&*store, &object).await?.is_some() {
                store
                    .put(&marker, PutPayload::new())
                    .await
                    .map_err(io_err)?;
            }
            Ok(())
        })
    }

    fn presigned_get(&self, key: &str, expires: Duration) -> Option<io::Result<String>> {
        Some(self.presign(key, expires))
    }
}

impl S3Backend {
    fn presign(&self, key: &str, expires: Duration) -> io::Result<String> {
        let (signer, path) = (self.inner.signer.clone(), self.inner.path(key));
        self.inner.run(async move {
            let url = signer
                .signed_url(http::Method::GET, &path, expires)
                .await
                .map_err(io_err)?;
            Ok(url.to_string())
        })
    }
}

/// Moves a body's chunks to its reader until either ends.
async fn pump(
    mut body: futures::stream::BoxStream<'static, object_store::Result<Bytes>>,
    tx: tokio::sync::mpsc::Sender<io::Result<Bytes>>,
) {
    loop {
        let item = match tokio::time::timeout(STREAM_IDLE, body.next()).await {
            Ok(Some(item)) => item.map_err(io_err),
            Ok(None) => return,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("object storage sent nothing for {STREAM_IDLE:?}"),
            )),
        };
        let failed = item.is_err();
        if tx.send(item).await.is_err() || failed {
            return;
        }
    }
}

struct BodyReader {
    rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    chunk: Bytes,
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            // tokio's channel works under any executor; blocking_recv would panic in async code.
            match futures::executor::block_on(self.rx.recv()) {
                None => return Ok(0),
                Some(chunk) => self.chunk = chunk?,
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

/// A multipart upload of a staging object, parts in flight.
struct Staged {
    path: Path,
    upload: Box<dyn MultipartUpload>,
    in_flight: VecDeque<JoinHandle<io::Result<()>>>,
}

struct S3Upload {
    inner: Arc<Inner>,
    /// The part being filled (grown on demand: a tag's upload needs a few bytes, not 8 MiB).
    buf: Vec<u8>,
    staged: Option<Staged>,
}

impl S3Upload {
    fn send_part(&mut self) -> io::Result<()> {
        let part = std::mem::replace(&mut self.buf, Vec::with_capacity(PART_SIZE));
        if self.staged.is_none() {
            let name = format!("{UPLOADS}{:032x}", rand::random::<u128>());
            let path = self.inner.path(&name);
            let (store, p) = (self.inner.store.clone(), path.clone());
            let upload = self
                .inner
                .run(async move { store.put_multipart(&p).await.map_err(io_err) })?;
            self.staged = Some(Staged {
                path,
                upload,
                in_flight: VecDeque::new(),
            });
        }
        let staged = self.staged.as_mut().expect("started above");
        let put = staged.upload.put_part(PutPayload::from(Bytes::from(part)));
        let task = self
            .inner
            .handle()
            .spawn(async move { put.await.map_err(io_err) });
        staged.in_flight.push_back(task);
        while staged.in_flight.len() > PARTS_IN_FLIGHT {
            join(staged.in_flight.pop_front().expect("non-empty"))?;
        }
        Ok(())
    }

    /// Sends the last part and completes the staging object: its path, for the copy into place.
    fn complete_staged(&mut self) -> io::Result<Path> {
        if !self.buf.is_empty() {
            self.send_part()?;
        }
        let mut staged = self.staged.take().expect("a staged upload");
        while let Some(task) = staged.in_flight.pop_front() {
            if let Err(e) = join(task) {
                self.staged = Some(staged); // dropped with self: the rest and the upload aborted
                return Err(e);
            }
        }
        let mut upload = staged.upload;
        self.inner.run(async move {
            match upload.complete().await {
                Ok(_) => Ok(staged.path),
                Err(e) => {
                    let _ = upload.abort().await;
                    Err(io_err(e))
                }
            }
        })
    }

    /// Publishes the bytes under `key`: put directly when they fit one part, else copied from
    /// the staging object, which is removed after.
    fn publish(&mut self, key: &str, mode: PutMode) -> io::Result<bool> {
        let store = self.inner.store.clone();
        let dest = self.inner.path(key);
        if self.staged.is_none() {
            let body = PutPayload::from(Bytes::from(std::mem::take(&mut self.buf)));
            return self.inner.run(async move {
                match store.put_opts(&dest, body, mode.into()).await {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
                    Err(e) => Err(io_err(e)),
                }
            });
        }
        let staging = self.complete_staged()?;
        self.inner.run(async move {
            let copied = match mode {
                PutMode::Create => store.copy_if_not_exists(&staging, &dest).await,
                _ => store.copy(&staging, &dest).await,
            };
            // Whatever the copy did; if this fails, the next open's sweep of stale uploads will.
            let _ = store.delete(&staging).await;
            match copied {
                Ok(()) => Ok(true),
                Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
                Err(e) => Err(io_err(e)),
            }
        })
    }
}

impl Write for S3Upload {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = (PART_SIZE - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == PART_SIZE {
            self.send_part()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Upload for S3Upload {
    fn create_if_absent(mut self: Box<Self>, key: &str) -> io::Result<bool> {
        if self.publish(key, PutMode::Create)? {
            return Ok(true);
        }
        // "Already there" must mean there: S3 also answers 409 to a conditional write that raced
        // another change of the key, after which the key may hold nothing.
        let (store, dest) = (self.inner.store.clone(), self.inner.path(key));
        match self.inner.run(async move { head(&*store, &dest).await })? {
            Some(_) => Ok(false),
            None => Err(io::Error::other(format!(
                "the conditional create of {key} conflicted with a concurrent change and \
                 published nothing"
            ))),
        }
    }

    fn replace(mut self: Box<Self>, key: &str) -> io::Result<()> {
        self.publish(key, PutMode::Overwrite).map(drop)
    }
}

impl Drop for S3Upload {
    fn drop(&mut self) {
        // Unpublished (dropped, or failed): its parts go now rather than at the lifecycle rule.
        if let Some(mut staged) = self.staged.take() {
            for task in &staged.in_flight {
                task.abort();
            }
            let _ = self.inner.run(async move {
                let _ = staged.upload.abort().await;
                Ok(())
            });
        }
    }
}
