//! Reading step reports back without stalling: each step copies its report into a
//! mappable buffer taken from a pool and maps it when the command buffer is submitted;
//! the caller reads it whenever it likes. Buffers go back to the pool once read, so a
//! loop that reads its reports allocates nothing after the first steps.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use std::ops::Range;

use futures_intrusive::channel::shared::{oneshot_channel, OneshotReceiver, OneshotSender};

use super::context::{guarded, GpuContext};
use crate::chain::Program;
use crate::error::ClipError;
use crate::norm::NormAcc;
use crate::report::{ClipReport, StageOutcome, UnitNorms};
use crate::shaders::abi::{self, Acc, StepReport, ACC_BYTES};

const PENDING: u8 = 0;
const MAPPED: u8 = 1;
const FAILED: u8 = 2;

/// How long an idle queue with a report still pending is watched before the step is
/// declared never submitted: checks `IDLE_CHECK` apart.
const NEVER_SUBMITTED: std::time::Duration = std::time::Duration::from_secs(1);
const IDLE_CHECK: std::time::Duration = std::time::Duration::from_micros(500);
const NEVER_SUBMITTED_CHECKS: u32 = (NEVER_SUBMITTED.as_micros() / IDLE_CHECK.as_micros()) as u32;

/// Free readback buffers of one batch.
pub(crate) struct ReportPool {
    free: Mutex<Vec<wgpu::Buffer>>,
    size: u64,
    /// The device is GL, which takes one thread at a time (how its reports are awaited).
    gl: bool,
}

impl ReportPool {
    pub(crate) fn new(device: &wgpu::Device, size: u64) -> Arc<ReportPool> {
        Arc::new(ReportPool {
            free: Mutex::new(Vec::new()),
            size,
            gl: device.adapter_info().backend == wgpu::Backend::Gl,
        })
    }

    pub(crate) fn take(&self, device: &wgpu::Device) -> Result<wgpu::Buffer, ClipError> {
        let reused = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match reused {
            Some(buffer) => Ok(buffer),
            None => guarded(device, || {
                Ok(device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("gradclip report readback"),
                    size: self.size,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                }))
            }),
        }
    }

    fn give_back(&self, buffer: wgpu::Buffer) {
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(buffer);
    }
}

/// Bytes of one stage's report header.
pub(crate) const REPORT_BYTES: u64 = std::mem::size_of::<StepReport>() as u64;

/// Where each part of a step's readback lies, in bytes: every stage's report header,
/// then (when a step reports its units) the last stage's group norms, the unit norms
/// and the unit coefficients. A units-only step (the first half of a sharded step)
/// holds the unit norms of the gradients, then of the parameters. The engine copies by
/// it and the decoders read by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReadbackLayout {
    stages: u64,
    groups: u64,
    units: u64,
}

impl ReadbackLayout {
    /// The layout of `program`'s readbacks.
    pub(crate) fn of(program: &Program) -> ReadbackLayout {
        let last = program.stages.last();
        ReadbackLayout {
            stages: program.stages.len() as u64,
            groups: last.map_or(0, |s| s.group_ranges.len()) as u64,
            units: program.units.len() as u64,
        }
    }

    /// The stage headers.
    pub(crate) fn headers(&self) -> Range<u64> {
        0..self.stages * REPORT_BYTES
    }

    /// The last stage's group norms.
    pub(crate) fn groups(&self) -> Range<u64> {
        let at = self.headers().end;
        at..at + self.groups * ACC_BYTES
    }

    /// The unit norms.
    pub(crate) fn units(&self) -> Range<u64> {
        let at = self.groups().end;
        at..at + self.units * ACC_BYTES
    }

    /// The unit coefficients (f32).
    pub(crate) fn coefs(&self) -> Range<u64> {
        let at = self.units().end;
        at..at + self.units * 4
    }

    /// Of a units-only step: the unit norms of the gradients (`table` 0) or of the
    /// parameters (1).
    pub(crate) fn unit_table(&self, table: u64) -> Range<u64> {
        let size = self.units * ACC_BYTES;
        table * size..(table + 1) * size
    }

    /// Bytes of a readback buffer that holds any step's readback.
    pub(crate) fn size(&self) -> u64 {
        self.coefs().end.max(self.unit_table(1).end)
    }

    /// Units of the program.
    pub(crate) fn n_units(&self) -> usize {
        self.units as usize
    }
}

/// The words of `words` in the byte range `bytes`.
pub(crate) fn words_in(words: &[u32], bytes: Range<u64>) -> &[u32] {
    &words[(bytes.start / 4) as usize..(bytes.end / 4) as usize]
}

/// How a report's mapping ended, shared by the report, the mapping's callback and the
/// report's waiting thread: `state` for blocking readers, and a oneshot that fires once with
/// the outcome (`MAPPED` or `FAILED`, or `PENDING` when the step was never submitted) for
/// an awaiting task. The first to know sends.
struct Signal {
    state: AtomicU8,
    send: OneshotSender<u8>,
    receive: OneshotReceiver<u8>,
}

/// A readback buffer of a recorded step, and how many of its bytes the step fills (only
/// those are mapped and read: a step that reads no unit norms maps its headers alone).
pub(crate) struct Readback {
    pub(crate) buffer: wgpu::Buffer,
    pub(crate) len: u64,
}

/// Turns the words read back into a report.
type Decoder<R> = Box<dyn FnOnce(&[u32]) -> Result<R, ClipError> + Send + Sync>;

/// The report of an encoded step, available once the GPU has run it.
///
/// Blocking code reads it with [`PendingReport::wait`]; [`PendingReport::is_ready`] tells
/// without blocking. Async code awaits it: a pending report is [`IntoFuture`], resolved by
/// the callback of the report's buffer mapping, so several steps can be in flight and
/// awaited in any order.
pub struct PendingReport<R = ClipReport> {
    buffer: Option<wgpu::Buffer>,
    /// The bytes of `buffer` the step fills.
    len: u64,
    signal: Arc<Signal>,
    pool: Arc<ReportPool>,
    device: wgpu::Device,
    decode: Option<Decoder<R>>,
}

impl<R> std::fmt::Debug for PendingReport<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingReport")
            .field("state", &self.signal.state.load(Ordering::Acquire))
            .finish()
    }
}

impl<R> PendingReport<R> {
    /// Schedules `buffer` to be mapped when `encoder` is submitted.
    pub(crate) fn on_submit(
        encoder: &wgpu::CommandEncoder,
        readback: Readback,
        pool: Arc<ReportPool>,
        device: wgpu::Device,
        decode: Decoder<R>,
    ) -> PendingReport<R> {
        let (send, receive) = oneshot_channel();
        let signal = Arc::new(Signal {
            state: AtomicU8::new(PENDING),
            send,
            receive,
        });
        let done = signal.clone();
        let Readback { buffer, len } = readback;
        encoder.map_buffer_on_submit(&buffer, wgpu::MapMode::Read, ..len, move |r| {
            let outcome = if r.is_ok() { MAPPED } else { FAILED };
            done.state.store(outcome, Ordering::Release);
            // Nobody may be waiting (the report is read blocking, or was dropped unread).
            let _ = done.send.send(outcome);
        });
        PendingReport {
            buffer: Some(buffer),
            len,
            signal,
            pool,
            device,
            decode: Some(decode),
        }
    }

    /// True once the report can be read without waiting (polls the device, never blocks).
    pub fn is_ready(&self) -> bool {
        let _ = self.device.poll(wgpu::PollType::Poll);
        self.signal.state.load(Ordering::Acquire) != PENDING
    }

    /// Waits for the GPU to finish the step and returns its report. With
    /// [`crate::NonFinitePolicy::Error`], a non-finite norm is returned as
    /// [`ClipError::NonFiniteNorm`] (the gradients were left unchanged).
    pub fn wait(mut self) -> Result<R, ClipError> {
        let outcome = wait_mapped(&self.device, &self.signal.state)?;
        self.read(outcome)
    }

    /// Decodes the mapped report, given how the mapping ended.
    fn read(&mut self, outcome: u8) -> Result<R, ClipError> {
        match outcome {
            MAPPED => {}
            FAILED => return Err(ClipError::Readback("mapping the report failed".into())),
            _ => {
                return Err(ClipError::Readback(
                    "the command buffer holding this step was never submitted".into(),
                ))
            }
        }
        let decode = self.decode.take().expect("decoder present until read");
        let buffer = self
            .buffer
            .take()
            .expect("report buffer present until read");
        // Decoded in place, not copied out: a warm step allocates nothing per unit. A
        // mapping is aligned to `wgpu::MAP_ALIGNMENT`, and the device's words are the
        // host's (every wgpu target is little-endian).
        let report = {
            let view = buffer
                .get_mapped_range(..self.len)
                .map_err(|e| ClipError::Readback(e.to_string()))?;
            let words: &[u32] = bytemuck::try_cast_slice(&view)
                .map_err(|e| ClipError::Readback(format!("report words: {e}")))?;
            decode(words)
        };
        buffer.unmap();
        self.pool.give_back(buffer);
        report
    }
}

/// Polls `device` until the mapping behind `state` has ended and returns its outcome, or
/// `PENDING` when the queue stays idle with the mapping not done (never submitted).
fn wait_mapped(device: &wgpu::Device, state: &AtomicU8) -> Result<u8, ClipError> {
    // Another thread's poll may have taken this step's callback and not yet run it, so
    // an idle queue with the report still pending is re-checked for a while before the
    // step is declared never submitted.
    let mut idle_checks = 0;
    while state.load(Ordering::Acquire) == PENDING && idle_checks < NEVER_SUBMITTED_CHECKS {
        let status = device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| ClipError::Readback(e.to_string()))?;
        if status.is_queue_empty() && state.load(Ordering::Acquire) == PENDING {
            idle_checks += 1;
            std::thread::sleep(IDLE_CHECK);
        }
    }
    Ok(state.load(Ordering::Acquire))
}

impl<R: 'static> IntoFuture for PendingReport<R> {
    type Output = Result<R, ClipError>;
    type IntoFuture = ReportFuture<R>;

    fn into_future(self) -> ReportFuture<R> {
        let signal = Box::pin(self.signal.receive.receive());
        let gl = self.pool.gl;
        ReportFuture {
            report: self,
            signal,
            driven: false,
            gl,
            idle_since: None,
        }
    }
}

/// A [`PendingReport`] being awaited: resolves to the step's report once the GPU has run
/// it (`pending.await`).
///
/// The buffer mapping's callback wakes the task. On native backends the device must be
/// polled for that callback to run, so the first poll that finds the report not ready
/// hands the waiting to a thread of its own, which polls the device until the step has
/// run. wgpu's GL backend takes one thread at a time, so there the future polls the
/// device itself each time the executor polls it and asks to be polled again. Either way
/// a step whose command buffer is never submitted resolves to [`ClipError::Readback`]
/// after the queue has stayed idle for about a second.
pub struct ReportFuture<R> {
    report: PendingReport<R>,
    signal: Pin<Box<dyn Future<Output = Option<u8>> + Send>>,
    /// A thread waits on the device for this report.
    driven: bool,
    /// The device is GL: polled from the awaiting task only.
    gl: bool,
    /// GL: when the queue was first seen idle with the report still pending.
    idle_since: Option<std::time::Instant>,
}

impl<R> std::fmt::Debug for ReportFuture<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReportFuture")
            .field("report", &self.report)
            .finish()
    }
}

impl<R> Future for ReportFuture<R> {
    type Output = Result<R, ClipError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if this.driven {
            return match this.signal.as_mut().poll(cx) {
                Poll::Ready(outcome) => Poll::Ready(this.report.read(outcome.unwrap_or(FAILED))),
                Poll::Pending => Poll::Pending,
            };
        }
        // Runs the mapping's callback if the GPU is already done, without blocking.
        let status = this.report.device.poll(wgpu::PollType::Poll);
        if let Poll::Ready(outcome) = this.signal.as_mut().poll(cx) {
            return Poll::Ready(this.report.read(outcome.unwrap_or(FAILED)));
        }
        if !this.gl {
            this.driven = true;
            this.report.drive();
            return Poll::Pending;
        }
        let idle = match status {
            Ok(s) => s.is_queue_empty(),
            // A device that cannot be polled (lost) will never map the report.
            Err(e) => return Poll::Ready(Err(ClipError::Readback(e.to_string()))),
        };
        match (idle, this.idle_since) {
            (false, _) => this.idle_since = None,
            (true, None) => this.idle_since = Some(std::time::Instant::now()),
            (true, Some(t)) if t.elapsed() > NEVER_SUBMITTED => {
                return Poll::Ready(this.report.read(PENDING));
            }
            (true, Some(_)) => {}
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<R> PendingReport<R> {
    /// Polls the device on a thread of its own until this step's mapping has ended, then
    /// wakes the awaiting task through the mapping's signal.
    fn drive(&self) {
        let device = self.device.clone();
        let signal = self.signal.clone();
        std::thread::spawn(move || {
            let outcome = wait_mapped(&device, &signal.state).unwrap_or(FAILED);
            // The callback has sent already unless the step failed to map or never ran.
            let _ = signal.send.send(outcome);
        });
    }
}

impl<R> Drop for PendingReport<R> {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            if self.signal.state.load(Ordering::Acquire) == MAPPED {
                buffer.unmap();
                self.pool.give_back(buffer);
            }
        }
    }
}

/// The accumulators stored in `words`.
fn accs(words: &[u32]) -> Vec<NormAcc> {
    words
        .chunks_exact(abi::words_of::<Acc>())
        .map(|w| abi::read::<Acc>(w).into())
        .collect()
}

/// The group norms, unit norms and coefficients the engine copies after the headers
/// (`Step::units`).
pub(crate) fn decode_units(words: &[u32], layout: &ReadbackLayout) -> UnitNorms {
    UnitNorms {
        groups: accs(words_in(words, layout.groups())),
        units: accs(words_in(words, layout.units())),
        coefs: bytemuck::cast_slice(words_in(words, layout.coefs())).to_vec(),
    }
}

/// The report header of every norm stage, from the front of a readback.
pub(crate) fn decode_stages(words: &[u32], layout: &ReadbackLayout) -> Vec<StageOutcome> {
    (words_in(words, layout.headers()).chunks_exact(abi::words_of::<StepReport>()))
        .map(|w| {
            let h: StepReport = abi::read(w);
            StageOutcome {
                total: h.norm.into(),
                threshold: h.threshold,
                coef: h.coef,
                status: h.status,
                clipped: h.clipped,
                skips: h.skips,
                loss_scale: (h.loss_scale, h.next_scale),
            }
        })
        .collect()
}

/// The words of `buffer`, read back through a staging buffer of its size (waits for the
/// GPU); every call is checked in error scopes.
pub(crate) fn read_words(ctx: &GpuContext, buffer: &wgpu::Buffer) -> Result<Vec<u32>, ClipError> {
    let device = &ctx.inner.device;
    let pending = guarded(device, || {
        let pool = ReportPool::new(device, buffer.size());
        let staging = pool.take(device)?;
        let mut encoder = device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, buffer.size());
        let len = buffer.size();
        let pending: PendingReport<Vec<u32>> = PendingReport::on_submit(
            &encoder,
            Readback {
                buffer: staging,
                len,
            },
            pool,
            device.clone(),
            Box::new(|w: &[u32]| Ok(w.to_vec())),
        );
        ctx.submit(encoder)?;
        Ok(pending)
    })?;
    pending.wait()
}
