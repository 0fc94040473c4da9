//! The gradient monitor: step reports (of a chain, or of a global clip) collected step
//! after step without stalling the GPU, exported as CSV and JSON lines, and drawn as PNG
//! or SVG charts (feature `plot`).

mod export;
#[cfg(feature = "plot")]
pub mod plot;

use std::collections::VecDeque;
use std::path::Path;

use crate::error::ClipError;
use crate::gpu::PendingReport;
use crate::report::ClipReport;
#[cfg(feature = "plot")]
use plot::{BarChart, LineChart};

/// Reports still in flight before [`GradMonitor::track`] waits for the oldest.
const DEFAULT_IN_FLIGHT: usize = 4;

/// Records, per step, the total norm before and after clipping, the threshold in force,
/// the coefficient, whether clipping fired, and (when the policy reports groups, see
/// [`crate::ClipPolicy::with_group_report`]) per-tensor and per-group norms before and
/// after.
///
/// GPU reports are handed over still pending ([`GradMonitor::track`]) and collected once
/// the GPU has produced them, a few steps late, so training never waits on a readback.
#[derive(Debug)]
pub struct GradMonitor {
    records: Vec<ClipReport>,
    pending: VecDeque<PendingReport<ClipReport>>,
    max_in_flight: usize,
}

impl Default for GradMonitor {
    fn default() -> Self {
        GradMonitor::new()
    }
}

impl GradMonitor {
    /// An empty monitor that keeps up to 4 GPU reports in flight.
    pub fn new() -> GradMonitor {
        GradMonitor {
            records: Vec::new(),
            pending: VecDeque::new(),
            max_in_flight: DEFAULT_IN_FLIGHT,
        }
    }

    /// Keeps up to `n` (at least 1) GPU reports in flight before waiting for the oldest.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// Records a report that is already at hand (the CPU path, or one waited for).
    pub fn record(&mut self, report: ClipReport) {
        self.records.push(report);
    }

    /// Takes a GPU report still in flight; collects, in step order, those that are ready.
    /// Waits only when more than `max_in_flight` are pending. A step whose report is an
    /// error (a non-finite norm under [`crate::NonFinitePolicy::Error`]) returns it.
    pub fn track(&mut self, pending: PendingReport<ClipReport>) -> Result<(), ClipError> {
        self.pending.push_back(pending);
        while self.pending.len() > self.max_in_flight {
            self.collect_front()?;
        }
        self.poll()
    }

    /// Collects the reports that are ready, in step order, without waiting.
    pub fn poll(&mut self) -> Result<(), ClipError> {
        while self.pending.front().is_some_and(|p| p.is_ready()) {
            self.collect_front()?;
        }
        Ok(())
    }

    /// Waits for every report in flight.
    pub fn flush(&mut self) -> Result<(), ClipError> {
        while !self.pending.is_empty() {
            self.collect_front()?;
        }
        Ok(())
    }

    fn collect_front(&mut self) -> Result<(), ClipError> {
        if let Some(p) = self.pending.pop_front() {
            self.records.push(p.wait()?);
        }
        Ok(())
    }

    /// Reports still in flight.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// The reports collected so far, in step order.
    pub fn records(&self) -> &[ClipReport] {
        &self.records
    }

    #[cfg(feature = "plot")]
    /// Total norm before and after clipping, and the threshold, over the steps, as a
    /// chart ready to save or extend.
    pub fn norms_chart(&self, log_y: bool) -> LineChart {
        let series = |f: &dyn Fn(&ClipReport) -> Option<f64>| -> Vec<(f64, f64)> {
            (self.records.iter())
                .filter_map(|r| f(r).map(|v| (r.step as f64, v)))
                .collect()
        };
        LineChart::new("Gradient norm per step", "step", "norm")
            .log_y(log_y)
            .line("before clipping", series(&|r| Some(r.total_norm)))
            .line("after clipping", series(&|r| r.total_norm_after))
            .dashed("threshold", series(&|r| r.threshold.map(f64::from)))
    }

    #[cfg(feature = "plot")]
    /// The loss scale of every step of a loss-scaled chain
    /// ([`crate::ClipPolicy::loss_scale`]) on a log axis: it drops at each skipped step
    /// (an overflow) and climbs after runs of finite ones.
    pub fn loss_scale_chart(&self) -> LineChart {
        let points = (self.records.iter())
            .filter_map(|r| Some((r.step as f64, f64::from(r.loss_scale?.scale))))
            .collect();
        LineChart::new("Loss scale per step", "step", "scale")
            .log_y(true)
            .line("scale", points)
    }

    #[cfg(feature = "plot")]
    /// Saves [`GradMonitor::loss_scale_chart`] as PNG or SVG (by the extension of `path`).
    pub fn plot_loss_scale(&self, path: impl AsRef<Path>) -> Result<(), ClipError> {
        self.loss_scale_chart().save(path)
    }

    #[cfg(feature = "plot")]
    /// Per-tensor norms before and after clipping at the last step that has them.
    pub fn layers_chart(&self, log_y: bool) -> BarChart {
        let last = self
            .records
            .iter()
            .rev()
            .find_map(|r| Some((r.step, r.tensors.as_ref()?)));
        let (step, tensors) = last.map_or((0, &[][..]), |(s, t)| (s, t.as_slice()));
        BarChart {
            title: format!("Per-layer gradient norm, step {step}"),
            y_label: "norm".into(),
            log_y,
            categories: tensors.iter().map(|t| t.name.clone()).collect(),
            bars: vec![
                ("before".into(), tensors.iter().map(|t| t.norm).collect()),
                (
                    "after".into(),
                    tensors.iter().map(|t| t.norm_after).collect(),
                ),
            ],
        }
    }

    #[cfg(feature = "plot")]
    /// Saves [`GradMonitor::norms_chart`] as PNG or SVG (by the extension of `path`).
    pub fn plot_norms(&self, path: impl AsRef<Path>, log_y: bool) -> Result<(), ClipError> {
        self.norms_chart(log_y).save(path)
    }

    #[cfg(feature = "plot")]
    /// Saves [`GradMonitor::layers_chart`] as PNG or SVG (by the extension of `path`).
    pub fn plot_layers(&self, path: impl AsRef<Path>, log_y: bool) -> Result<(), ClipError> {
        self.layers_chart(log_y).save(path)
    }

    /// Writes one CSV row per step: `step, total_norm, total_norm_after, threshold, coef,
    /// clipped, clipped_units, units, skipped, non_finite, nans_zeroed, loss_scale` (empty
    /// cells where a value does not apply; `loss_scale` is the scale the step's gradients
    /// carried, for a loss-scaled chain).
    pub fn write_csv(&self, path: impl AsRef<Path>) -> Result<(), ClipError> {
        export::write(path.as_ref(), |out| export::steps_csv(&self.records, out))
    }

    /// Writes one CSV row per step and tensor: `step, tensor, norm, norm_after`.
    pub fn write_tensor_csv(&self, path: impl AsRef<Path>) -> Result<(), ClipError> {
        export::write(path.as_ref(), |out| export::tensors_csv(&self.records, out))
    }

    /// Writes one JSON object per line and step, with the fields of the CSV plus
    /// `tensors` and `groups` arrays when present; non-finite numbers are `null`.
    pub fn write_jsonl(&self, path: impl AsRef<Path>) -> Result<(), ClipError> {
        export::write(path.as_ref(), |out| export::jsonl(&self.records, out))
    }
}
