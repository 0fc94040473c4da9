//! The one all-reduce of a sharded step: the partial norm of every unit (and, for AGC, of
//! the parameters' units), merged over the ranks as the monoid [`NormAcc`] merges: MAX of
//! the scales, SUM of the sums rescaled to that maximum, OR of the flags. Three
//! collectives on vectors of one entry per unit, whatever the chain.

use super::collective::Collective;
use crate::error::ClipError;
use crate::norm::{Norm, NormAcc};

/// Replaces every accumulator of `parts` (each a table with its norm order) by its merge
/// over the ranks. Every rank ends with the same numbers. `local` is this rank's verdict
/// on its own step so far: a rank that failed (bad input, a device error) still takes part
/// with empty tables, so no rank waits for it, and then every rank returns an error and
/// changes nothing: the failing rank its own error, the others [`ClipError::Collective`].
/// `step` is this rank's step number, `multiplier` its schedule's factor at that step and
/// `loss_scale` the loss scale its gradients carry (0 without loss scaling): ranks at
/// different steps, whose (custom) schedules give different factors, or whose loss
/// scales differ (states restored apart), all fail. All are exchanged exactly, as 32-bit
/// words.
pub(crate) fn all_reduce(
    comm: &dyn Collective,
    parts: &mut [(&mut [NormAcc], Norm)],
    (step, multiplier, loss_scale): (u64, f32, f32),
    local: Result<(), ClipError>,
) -> Result<(), ClipError> {
    if local.is_err() {
        for (table, _) in parts.iter_mut() {
            table.fill(NormAcc::IDENTITY);
        }
    }
    let accs = || {
        parts
            .iter()
            .flat_map(|(t, norm)| t.iter().map(move |a| (a, *norm)))
    };
    let mut scales: Vec<f64> = accs().map(|(a, _)| a.scale).collect();
    // Then what must agree, and its negation: a rank whose last step failed after the
    // merge (a lost device) is a step behind, and every rank stops here together. A
    // rank that failed this step sends -inf, which changes no maximum.
    let agree = [
        step >> 32,
        step & 0xffff_ffff,
        multiplier.to_bits() as u64,
        loss_scale.to_bits() as u64,
    ];
    let mine = agree.map(|v| {
        if local.is_ok() {
            v as f64
        } else {
            f64::NEG_INFINITY
        }
    });
    scales.extend(mine);
    scales.extend(mine.map(|v| if v.is_finite() { -v } else { v }));
    comm.all_reduce_max(&mut scales)?;
    let negated = scales.split_off(scales.len() - agree.len());
    let agreed = scales.split_off(scales.len() - agree.len());
    if agreed.iter().zip(&negated).any(|(a, n)| *a != -*n) {
        local?;
        return Err(ClipError::Collective(format!(
            "the ranks are at different steps, their schedules give different factors or \
             their loss scales differ (this one at step {step}, factor {multiplier}, loss \
             scale {loss_scale}): a step failed on some rank, their custom schedules \
             differ, or they restored different states"
        )));
    }
    let mut sums: Vec<f64> = (accs().zip(&scales))
        .map(|((a, norm), &max)| a.rescaled_sum(norm, max))
        .collect();
    comm.all_reduce_sum(&mut sums)?;
    // The flags, then one word that is 1 where a rank failed.
    let mut flags: Vec<u32> = accs().map(|(a, _)| a.flags).collect();
    flags.push(local.is_err() as u32);
    comm.all_reduce_or(&mut flags)?;
    local?;
    if flags.pop() != Some(0) {
        return Err(ClipError::Collective(
            "another rank could not run this step (bad input or a device error); \
             no rank changed its gradients"
                .into(),
        ));
    }
    let mut merged = scales.iter().zip(&sums).zip(&flags);
    for (table, norm) in parts.iter_mut() {
        for (acc, ((&scale, &sum), &flags)) in table.iter_mut().zip(&mut merged) {
            *acc = if scale == 0.0 {
                NormAcc {
                    flags,
                    ..NormAcc::IDENTITY
                }
            } else {
                NormAcc {
                    scale,
                    sum: if *norm == Norm::Inf { 0.0 } else { sum },
                    flags,
                }
            };
        }
    }
    Ok(())
}
