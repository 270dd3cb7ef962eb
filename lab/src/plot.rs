//! The freeze benchmark's SVG: what the guests' writers saw over time with
//! every freeze shaded, and the freeze window against disk size for each
//! provider.

use std::path::Path;

use plotters::prelude::*;

use crate::freeze_bench::Results;
use crate::{Error, Result};

const GIB: f64 = (1u64 << 30) as f64;

fn provider_color(p: &str) -> RGBColor {
    match p {
        "reflink" => RGBColor(31, 119, 180),
        _ => RGBColor(214, 39, 40),
    }
}

/// Each guest's writes cut into 20 ms buckets, keeping the slowest of each:
/// a stall survives, a million points do not.
fn buckets(samples: &[(u64, u32)]) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::new();
    let mut current: Option<(u64, u32)> = None;
    for &(at, took) in samples {
        let b = at / 20_000;
        match current {
            Some((cb, worst)) if cb == b => current = Some((cb, worst.max(took))),
            Some((cb, worst)) => {
                out.push((cb as f64 * 0.02, f64::from(worst) / 1000.0));
                current = Some((b, took));
            }
            None => current = Some((b, took)),
        }
    }
    if let Some((cb, worst)) = current {
        out.push((cb as f64 * 0.02, f64::from(worst) / 1000.0));
    }
    out
}

/// The legend, in the same place and style on both charts.
fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
}

pub fn freeze(r: &Results, path: &Path) -> Result<()> {
    let e = |e: &dyn std::fmt::Display| Error::Refused {
        what: format!("plot {}", path.display()),
        reason: e.to_string(),
    };
    let root = SVGBackend::new(path, (1100, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let (top, bottom) = root.split_vertically(500);

    // The timeline of the last disk size measured.
    let last_size = r.summary.last().map_or(0, |s| s.disk_size);
    let rounds: Vec<_> = r
        .rounds
        .iter()
        .filter(|x| x.disk_size == last_size)
        .collect();
    // Up to four guests are drawn one by one; more are drawn as one series,
    // the slowest write of any guest in each 20 ms, which keeps every stall
    // and keeps the file small.
    let series: Vec<Vec<(f64, f64)>> = if r.samples.len() <= 4 {
        r.samples.iter().map(|s| buckets(s)).collect()
    } else {
        let mut all: Vec<(u64, u32)> = r.samples.iter().flatten().copied().collect();
        all.sort_unstable_by_key(|s| s.0);
        vec![buckets(&all)]
    };
    // The last size's run only: its own start, not the bench's.
    let x_min = rounds
        .iter()
        .map(|x| x.started_us as f64 / 1e6)
        .chain(series.iter().flatten().map(|p| p.0))
        .fold(f64::INFINITY, f64::min);
    let x_min = if x_min.is_finite() {
        (x_min - 1.0).max(0.0)
    } else {
        0.0
    };
    let x_max = series
        .iter()
        .flatten()
        .map(|p| p.0)
        .chain(rounds.iter().map(|x| x.ended_us as f64 / 1e6))
        .fold(1.0, f64::max);
    let y_max = series.iter().flatten().map(|p| p.1).fold(1.0, f64::max) * 2.0;
    let y_min = 0.01;
    let mut chart = ChartBuilder::on(&top)
        .caption(
            format!(
                "Write latency in {} guest(s) ({} GiB disks), freezes shaded",
                r.guests,
                last_size as f64 / GIB
            ),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x_min..x_max, (y_min..y_max).log_scale())
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("write + fdatasync, ms")
        .draw()
        .map_err(|x| e(&x))?;
    for provider in ["reflink", "copy"] {
        let spans: Vec<(f64, f64)> = rounds
            .iter()
            .filter(|x| x.provider == provider)
            .filter_map(|x| x.frozen_span())
            .map(|(a, b)| (a as f64 / 1e6, b as f64 / 1e6))
            .collect();
        if spans.is_empty() {
            continue;
        }
        let color = provider_color(provider);
        chart
            .draw_series(spans.iter().map(|&(a, b)| {
                // A freeze of a millisecond is still drawn a pixel wide.
                let b = b.max(a + (x_max - x_min) / 1000.0);
                Rectangle::new([(a, y_min), (b, y_max)], color.mix(0.3).filled())
            }))
            .map_err(|x| e(&x))?
            .label(format!("{provider}: first freeze to last thaw"))
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.mix(0.3).filled())
            });
    }
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i + 3).mix(0.9);
        // Dots, not a line: a held write is one slow point at its start,
        // and a line from it would draw latencies nobody measured.
        let drawn = chart
            .draw_series(s.iter().map(|&p| Circle::new(p, 1, color.filled())))
            .map_err(|x| e(&x))?;
        let name = if r.samples.len() <= 4 {
            format!("g{i}")
        } else {
            format!("slowest of {} guests", r.samples.len())
        };
        if i < 8 {
            drawn
                .label(name)
                .legend(move |(x, y)| Circle::new((x + 6, y), 3, color.filled()));
        }
    }
    legend(&mut chart).map_err(|x| e(&x))?;

    // Freeze window against disk size.
    let sizes: Vec<f64> = r.summary.iter().map(|s| s.disk_size as f64 / GIB).collect();
    let x_lo = sizes
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .max(1e-3)
        / 2.0;
    let x_hi = sizes.iter().copied().fold(0.0, f64::max).max(x_lo * 4.0) * 2.0;
    let w_max = r
        .summary
        .iter()
        .map(|s| s.freeze_window_us.max as f64 / 1000.0)
        .fold(1.0, f64::max)
        * 2.0;
    let mut chart = ChartBuilder::on(&bottom)
        .caption(
            "Freeze window per guest against disk size (p50 line, max dots)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), (0.1f64..w_max).log_scale())
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("disk size, GiB")
        .y_desc("freeze window, ms")
        .draw()
        .map_err(|x| e(&x))?;
    for provider in ["reflink", "copy"] {
        let pts: Vec<(f64, f64, f64)> = r
            .summary
            .iter()
            .filter(|s| s.provider == provider && s.disk_size > 0)
            .map(|s| {
                (
                    s.disk_size as f64 / GIB,
                    (s.freeze_window_us.p50 as f64 / 1000.0).max(0.1),
                    (s.freeze_window_us.max as f64 / 1000.0).max(0.1),
                )
            })
            .collect();
        if pts.is_empty() {
            continue;
        }
        let color = provider_color(provider);
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.0, p.1)),
                color.stroke_width(2),
            ))
            .map_err(|x| e(&x))?
            .label(provider)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 12, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                pts.iter()
                    .map(|p| Circle::new((p.0, p.1), 4, color.filled())),
            )
            .map_err(|x| e(&x))?;
        chart
            .draw_series(
                pts.iter()
                    .map(|p| Circle::new((p.0, p.2), 4, color.stroke_width(1))),
            )
            .map_err(|x| e(&x))?;
    }
    legend(&mut chart).map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
