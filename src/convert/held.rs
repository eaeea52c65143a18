//! A conversion's response starts once its first [`HOLD`] bytes exist (or all of them, if fewer, or
//! [`HOLD_TIME`] after merged bytes began to flow):
//! a fault found by then (a registry that fails, a hostile or broken top layer) is still answered
//! with a status and a JSON body, and a merge that stopped for the layers' summaries or outgrew its
//! bound is run again with them, unseen by the client. A fault found later aborts the transfer.

use std::future::Future;
use std::io;
use std::time::Duration;

use futures::StreamExt;

use super::error::{caused_by, stream_error};
use super::{
    AciRequest, ByteStream, Converter, Error, Planned, PlannedAci, Prepared, PreparedAci,
    SquashRequest,
};
use crate::format::docker_archive::SizeExceeded;
use crate::merge::NeedsSummary;

/// Bytes a response holds back before it starts: a few milliseconds of merging, enough for most
/// top layers' faults and for small images whole.
pub const HOLD: usize = 1 << 20;

/// How long a response holds back once merged bytes flow (a chunk past the archive's head): a stalled
/// lower layer does not hold back what is ready.
pub const HOLD_TIME: Duration = Duration::from_millis(250);

/// `body`, once its first `bytes` arrived, or its end, or `wait` after merged bytes began to flow;
/// its error if one came first.
pub async fn hold(mut body: ByteStream, bytes: usize, wait: Duration) -> io::Result<ByteStream> {
    let mut held = Vec::new();
    let mut n = 0;
    let mut deadline = None;
    while n < bytes {
        let next = match deadline {
            None => body.next().await,
            Some(at) => match tokio::time::timeout_at(at, body.next()).await {
                Ok(next) => next,
                Err(_) => break,
            },
        };
        match next {
            Some(Ok(chunk)) => {
                n += chunk.len();
                held.push(Ok(chunk));
                if held.len() == 2 {
                    deadline = Some(tokio::time::Instant::now() + wait);
                }
            }
            Some(Err(e)) => return Err(e),
            None => return Ok(Box::pin(futures::stream::iter(held))),
        }
    }
    Ok(Box::pin(futures::stream::iter(held).chain(body)))
}

/// Whether the conversion that failed with `e` succeeds when run again: it marked its image to be
/// merged with summaries and sized exactly.
fn again(e: &io::Error) -> bool {
    caused_by::<NeedsSummary>(e) || caused_by::<SizeExceeded>(e)
}

/// A prepared response whose body can be held.
trait Held: Sized {
    fn body(&mut self) -> &mut ByteStream;
}

impl Held for Prepared {
    fn body(&mut self) -> &mut ByteStream {
        &mut self.body
    }
}

impl Held for PreparedAci {
    fn body(&mut self) -> &mut ByteStream {
        &mut self.body
    }
}

/// `prepared` with its body held; if the conversion must be run again, the one `retry` prepares.
async fn held<P: Held>(
    mut prepared: P,
    retry: impl Future<Output = Result<P, Error>>,
) -> Result<P, Error> {
    let body = std::mem::replace(prepared.body(), Box::pin(futures::stream::empty()));
    match hold(body, HOLD, HOLD_TIME).await {
        Ok(body) => {
            *prepared.body() = body;
            Ok(prepared)
        }
        Err(e) if again(&e) => {
            tracing::info!(error = %e, "converting again with the layers' summaries");
            let mut prepared = retry.await?;
            let body = std::mem::replace(prepared.body(), Box::pin(futures::stream::empty()));
            *prepared.body() = hold(body, HOLD, HOLD_TIME).await.map_err(stream_error)?;
            Ok(prepared)
        }
        Err(e) => Err(stream_error(e)),
    }
}

impl Converter {
    /// [`Converter::prepare_planned`], its body held ([`hold`]); `request` plans it again if the
    /// first conversion must be run again.
    pub async fn prepare_held(
        &self,
        planned: Planned,
        request: SquashRequest,
    ) -> Result<Prepared, Error> {
        let prepared = self.prepare_planned(planned).await?;
        held(prepared, async {
            self.prepare_planned(self.plan(request).await?).await
        })
        .await
    }

    /// [`Converter::prepare_planned_aci`], its body held ([`hold`]).
    pub async fn prepare_held_aci(
        &self,
        planned: PlannedAci,
        request: AciRequest,
    ) -> Result<PreparedAci, Error> {
        let prepared = self.prepare_planned_aci(planned).await?;
        held(prepared, async {
            self.prepare_planned_aci(self.plan_aci(request).await?)
                .await
        })
        .await
    }
}
