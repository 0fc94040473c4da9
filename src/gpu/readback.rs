//! Reading step reports back without stalling: each step copies its report into a
//! mappable buffer taken from a pool and maps it when the command buffer is submitted;
//! the caller reads it whenever it likes. Buffers go back to the pool once read, so a
//! loop that reads its reports allocates nothing after the first steps.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use super::context::{guarded, GpuContext};
use crate::error::ClipError;
use crate::non_finite::NonFinitePolicy;
use crate::norm::{Norm, NormAcc};
use crate::report::{ClipReport, ReportShape, StageOutcome, UnitNorms};
use crate::shaders::abi::{self, Acc, StepReport};

const PENDING: u8 = 0;
const MAPPED: u8 = 1;
const FAILED: u8 = 2;

/// Free readback buffers of one batch.
pub(crate) struct ReportPool {
    free: Mutex<Vec<wgpu::Buffer>>,
    size: u64,
}

impl ReportPool {
    pub(crate) fn new(size: u64) -> Arc<ReportPool> {
        Arc::new(ReportPool {
            free: Mutex::new(Vec::new()),
            size,
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

/// What a global-norm report means: a norm only, or a clipping step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReportKind {
    pub norm: Norm,
    pub clip: Option<NonFinitePolicy>,
    pub max_norm: Option<f32>,
    pub tensor_norms: Option<usize>,
    /// The engine's sequence number of the step, for [`ClipError::StepOverwritten`].
    pub seq: u64,
}

/// Turns the words read back into a report.
type Decoder<R> = Box<dyn FnOnce(&[u32]) -> Result<R, ClipError> + Send + Sync>;

/// The report of an encoded step ([`ClipReport`], or [`crate::PolicyReport`] for
/// policies), available once the GPU has run it. Read it with [`PendingReport::wait`];
/// [`PendingReport::is_ready`] tells without blocking.
pub struct PendingReport<R = ClipReport> {
    buffer: Option<wgpu::Buffer>,
    state: Arc<AtomicU8>,
    pool: Arc<ReportPool>,
    device: wgpu::Device,
    decode: Option<Decoder<R>>,
}

impl<R> std::fmt::Debug for PendingReport<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingReport")
            .field("state", &self.state.load(Ordering::Acquire))
            .finish()
    }
}

impl<R> PendingReport<R> {
    /// Schedules `buffer` to be mapped when `encoder` is submitted.
    pub(crate) fn on_submit(
        encoder: &wgpu::CommandEncoder,
        buffer: wgpu::Buffer,
        pool: Arc<ReportPool>,
        device: wgpu::Device,
        decode: Decoder<R>,
    ) -> PendingReport<R> {
        let state = Arc::new(AtomicU8::new(PENDING));
        let done = state.clone();
        encoder.map_buffer_on_submit(&buffer, wgpu::MapMode::Read, .., move |r| {
            done.store(if r.is_ok() { MAPPED } else { FAILED }, Ordering::Release);
        });
        PendingReport {
            buffer: Some(buffer),
            state,
            pool,
            device,
            decode: Some(decode),
        }
    }

    /// The same pending report, turned into `S` by `f` when it is read.
    pub(crate) fn map<S: 'static>(
        mut self,
        f: impl FnOnce(R) -> S + Send + Sync + 'static,
    ) -> PendingReport<S>
    where
        R: 'static,
    {
        let decode = self.decode.take().expect("a pending report decodes once");
        PendingReport {
            buffer: self.buffer.take(),
            state: self.state.clone(),
            pool: self.pool.clone(),
            device: self.device.clone(),
            decode: Some(Box::new(move |words| decode(words).map(f))),
        }
    }

    /// True once the report can be read without waiting (polls the device, never blocks).
    pub fn is_ready(&self) -> bool {
        let _ = self.device.poll(wgpu::PollType::Poll);
        self.state.load(Ordering::Acquire) != PENDING
    }

    /// Waits for the GPU to finish the step and returns its report. With
    /// [`NonFinitePolicy::Error`], a non-finite norm is returned as
    /// [`ClipError::NonFiniteNorm`] (the gradients were left unchanged).
    pub fn wait(mut self) -> Result<R, ClipError> {
        // Another thread's poll may have taken this step's callback and not yet run it,
        // so an idle queue with the report still pending is re-checked for a while before
        // the step is declared never submitted.
        let mut idle_checks = 0;
        while self.state.load(Ordering::Acquire) == PENDING && idle_checks < 2000 {
            let status = self
                .device
                .poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| ClipError::Readback(e.to_string()))?;
            if status.is_queue_empty() && self.state.load(Ordering::Acquire) == PENDING {
                idle_checks += 1;
                std::thread::sleep(std::time::Duration::from_micros(500));
            }
        }
        match self.state.load(Ordering::Acquire) {
            MAPPED => {}
            FAILED => return Err(ClipError::Readback("mapping the report failed".into())),
            _ => {
                return Err(ClipError::Readback(
                    "the command buffer holding this step was never submitted".into(),
                ))
            }
        }
        let buffer = self
            .buffer
            .take()
            .expect("report buffer present until read");
        let words: Vec<u32> = {
            let view = buffer
                .get_mapped_range(..)
                .map_err(|e| ClipError::Readback(e.to_string()))?;
            view.chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        };
        buffer.unmap();
        self.pool.give_back(buffer);
        let decode = self.decode.take().expect("decoder present until read");
        decode(&words)
    }
}

impl<R> Drop for PendingReport<R> {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            if self.state.load(Ordering::Acquire) == MAPPED {
                buffer.unmap();
                self.pool.give_back(buffer);
            }
        }
    }
}

/// `count` accumulators stored from word `first` on.
fn accs_at(words: &[u32], first: usize, count: usize) -> Vec<NormAcc> {
    let n = abi::words_of::<Acc>();
    (0..count)
        .map(|i| abi::read::<Acc>(&words[first + n * i..]).into())
        .collect()
}

/// The group norms, unit norms and coefficients the engine copies after the header
/// (`Step::units`).
pub(crate) fn decode_units(words: &[u32], shape: &ReportShape, units: usize) -> UnitNorms {
    let n_groups = shape.groups();
    let header = abi::words_of::<StepReport>() * shape.stages();
    let units0 = header + abi::words_of::<Acc>() * n_groups;
    let coefs0 = units0 + abi::words_of::<Acc>() * units;
    UnitNorms {
        groups: accs_at(words, header, n_groups),
        units: accs_at(words, units0, units),
        coefs: bytemuck::cast_slice(&words[coefs0..coefs0 + units]).to_vec(),
    }
}

/// The report header of every norm stage, from the front of a readback.
pub(crate) fn decode_stages(words: &[u32], stages: usize) -> Vec<StageOutcome> {
    let n = abi::words_of::<StepReport>();
    (0..stages)
        .map(|k| {
            let h: StepReport = abi::read(&words[k * n..]);
            StageOutcome {
                total: h.norm.into(),
                threshold: h.threshold,
                coef: h.coef,
                status: h.status,
                clipped: h.clipped,
                skips: h.skips,
            }
        })
        .collect()
}

/// A global-norm step's report from the engine's header and, when asked, unit norms.
pub(crate) fn decode_clip(words: &[u32], kind: ReportKind) -> Result<ClipReport, ClipError> {
    let header: StepReport = abi::read(words);
    if header.status & abi::STATUS_STALE != 0 {
        return Err(ClipError::StepOverwritten(kind.seq));
    }
    let acc = header.norm.into();
    // One group: the units follow the header and that group's norm.
    let first = abi::words_of::<StepReport>() + abi::words_of::<Acc>();
    let tensor_norms = kind.tensor_norms.map(|n| {
        accs_at(words, first, n)
            .iter()
            .map(|a| a.total(kind.norm))
            .collect()
    });
    match kind.clip {
        Some(policy) => ClipReport::new(
            kind.norm,
            acc,
            header.coef,
            header.status,
            policy,
            tensor_norms,
            kind.max_norm,
        ),
        // A norm-only step scales nothing, whatever the finishing pass computed.
        None => ClipReport::new(
            kind.norm,
            acc,
            1.0,
            header.status & abi::STATUS_NONFINITE,
            NonFinitePolicy::Propagate,
            tensor_norms,
            None,
        ),
    }
}

/// The words of `buffer`, read back through a staging buffer of its size (waits for the
/// GPU); every call is checked in error scopes.
pub(crate) fn read_words(ctx: &GpuContext, buffer: &wgpu::Buffer) -> Result<Vec<u32>, ClipError> {
    let device = &ctx.inner.device;
    let pending = guarded(device, || {
        let pool = ReportPool::new(buffer.size());
        let staging = pool.take(device)?;
        let mut encoder = device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, buffer.size());
        let pending: PendingReport<Vec<u32>> = PendingReport::on_submit(
            &encoder,
            staging,
            pool,
            device.clone(),
            Box::new(|w: &[u32]| Ok(w.to_vec())),
        );
        ctx.submit(encoder)?;
        Ok(pending)
    })?;
    pending.wait()
}
