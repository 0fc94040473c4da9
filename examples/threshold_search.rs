//! Which max_norm? Trains the relu-sgd RNN of `rnn_explode` with its gradients clipped on
//! the GPU at 0.1, 0.5, 1, 2, 5 and 10 (and not at all), and prints the final losses.
//!
//!     cargo run --release --example threshold_search -- [--steps N] [--seeds N]
//!
//! Each setting is trained from the same seeds on the same data; the validation loss is
//! measured on 256 held-out sequences and averaged over the seeds.

#[path = "support/rnn.rs"]
mod rnn;

use gradclip::GpuContext;
use rnn::{train, GpuClipper, Preset};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut preset = Preset::relu_sgd();
    let mut seeds = 3u64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--steps" => preset.steps = args.next().ok_or("--steps N")?.parse()?,
            "--seeds" => seeds = args.next().ok_or("--seeds N")?.parse()?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let ctx = GpuContext::new()?;
    println!(
        "relu-sgd RNN, {} steps, {} seed(s), clipping on {}",
        preset.steps,
        seeds,
        ctx.adapter_info()
            .map_or("a wgpu device".into(), |i| i.name.clone())
    );
    println!("\n max_norm | train loss (last 50) | validation loss | steps clipped");
    let mut best: Option<(f32, f64)> = None;
    for max_norm in [0.1f32, 0.5, 1.0, 2.0, 5.0, 10.0, f32::INFINITY] {
        let (mut train_loss, mut validation, mut fired, mut total) = (0.0, 0.0, 0, 0);
        for seed in 0..seeds {
            let history = if max_norm.is_finite() {
                let mut clipper = GpuClipper::new(&ctx, max_norm)?;
                let h = clipper.train(&preset, seed)?;
                let records = clipper.monitor.records();
                fired += records.iter().filter(|r| r.clipped_units > 0).count();
                total += records.len();
                h
            } else {
                train(&preset, seed, |_| {})
            };
            let n = history.losses.len().min(50);
            train_loss += history.losses[history.losses.len() - n..]
                .iter()
                .sum::<f64>()
                / n as f64;
            validation += history.validation;
        }
        let (train_loss, validation) = (train_loss / seeds as f64, validation / seeds as f64);
        let name = if max_norm.is_finite() {
            format!("{max_norm}")
        } else {
            "none".into()
        };
        let clipped = if total > 0 {
            format!("{:.0}%", 100.0 * fired as f64 / total as f64)
        } else {
            "-".into()
        };
        println!(" {name:>8} | {train_loss:>20.4} | {validation:>15.4} | {clipped:>13}");
        if max_norm.is_finite()
            && validation.is_finite()
            && best.is_none_or(|(_, v)| validation < v)
        {
            best = Some((max_norm, validation));
        }
    }
    match best {
        Some((c, v)) => println!("\nbest max_norm: {c} (validation loss {v:.4})"),
        None => println!("\nno clip value gave a finite validation loss"),
    }
    Ok(())
}
