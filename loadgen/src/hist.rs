//! Latency histograms: an HdrHistogram of microseconds with fixed bounds, its merge, its
//! transport between processes (V2 serialization, base64 in a JSON string) and its
//! percentile read-outs, including the standard `.hgrm` percentile-distribution text.
//!
//! Every histogram the loadgen makes has the same bounds (1 us to one hour, 3 significant
//! digits), so merging never loses precision. Values above the bound are clamped to it and
//! counted, not dropped.

use std::fmt::Write as _;

use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize, Serializer};

/// Highest value tracked: one hour in microseconds.
pub const HIGHEST_US: u64 = 3_600_000_000;
/// Significant decimal digits kept (0.1% relative precision).
const SIGFIG: u8 = 3;

/// A histogram of microsecond values. See the module documentation.
#[derive(Clone, Debug)]
pub struct Hist(Histogram<u64>);

impl Default for Hist {
    fn default() -> Self {
        Hist::new()
    }
}

/// The usual read-outs of a histogram, in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub p9999: u64,
    pub max: u64,
}

impl Hist {
    pub fn new() -> Hist {
        // Invariant: 1 <= 2 * 1 <= HIGHEST_US and SIGFIG <= 5 are the documented valid
        // arguments of new_with_bounds, so this cannot fail.
        let h = Histogram::new_with_bounds(1, HIGHEST_US, SIGFIG).expect("valid constant bounds");
        Hist(h)
    }

    /// Records one value (0 and values above [`HIGHEST_US`] are clamped into range).
    pub fn record(&mut self, us: u64) {
        self.0.saturating_record(us.clamp(1, HIGHEST_US));
    }

    /// Adds every count of `other` to this one.
    pub fn merge(&mut self, other: &Hist) -> Result<(), String> {
        self.0.add(&other.0).map_err(|e| format!("{e:?}"))
    }

    #[cfg(test)]
    pub fn len(&self) -> u64 {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn max(&self) -> u64 {
        self.0.max()
    }

    /// The value at quantile `q` (0.0 to 1.0); 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.0.is_empty() {
            0
        } else {
            self.0.value_at_quantile(q)
        }
    }

    pub fn percentiles(&self) -> Percentiles {
        if self.0.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: self.0.len(),
            min: self.0.min(),
            mean: self.0.mean(),
            p50: self.quantile(0.5),
            p90: self.quantile(0.9),
            p99: self.quantile(0.99),
            p999: self.quantile(0.999),
            p9999: self.quantile(0.9999),
            max: self.0.max(),
        }
    }

    /// The percentile curve for plots: (quantile iterated to, value in us), from the same
    /// iteration as [`Hist::write_hgrm`].
    pub fn curve(&self) -> Vec<(f64, u64)> {
        if self.0.is_empty() {
            return Vec::new();
        }
        self.0
            .iter_quantiles(5)
            .map(|v| (v.quantile_iterated_to(), v.value_iterated_to()))
            .collect()
    }

    /// The V2 serialization (uncompressed), base64-encoded.
    pub fn to_base64(&self) -> String {
        let mut bytes = Vec::new();
        // Writing into a Vec cannot fail for I/O reasons; a histogram of u64 counts always
        // serializes (the only other error is a count too large for the format, which u64
        // counts of a test run never reach). An empty string would read back as an error.
        if V2Serializer::new().serialize(&self.0, &mut bytes).is_err() {
            return String::new();
        }
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    pub fn from_base64(text: &str) -> Result<Hist, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| format!("histogram base64: {e}"))?;
        let h: Histogram<u64> = Deserializer::new()
            .deserialize(&mut &bytes[..])
            .map_err(|e| format!("histogram V2: {e:?}"))?;
        let mut out = Hist::new();
        out.0
            .add(&h)
            .map_err(|e| format!("histogram bounds: {e:?}"))?;
        Ok(out)
    }

    /// The percentile distribution in HdrHistogram's standard text form
    /// (`outputPercentileDistribution` with 5 ticks per half distance), values divided by
    /// `scale` (1000.0 prints milliseconds from microseconds). HdrHistogram's plotters read it.
    pub fn write_hgrm(&self, scale: f64) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:>12} {:>14} {:>10} {:>14}\n",
            "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
        );
        let mut total = 0u64;
        if !self.0.is_empty() {
            for v in self.0.iter_quantiles(5) {
                total += v.count_since_last_iteration();
                let value = v.value_iterated_to() as f64 / scale;
                let q = v.quantile_iterated_to();
                if q < 1.0 {
                    let _ = writeln!(
                        out,
                        "{value:12.3} {q:2.12} {total:10} {:14.2}",
                        1.0 / (1.0 - q)
                    );
                } else {
                    let _ = writeln!(out, "{value:12.3} {q:2.12} {total:10}");
                }
            }
        }
        let (mean, sd, max) = if self.0.is_empty() {
            (0.0, 0.0, 0.0)
        } else {
            (
                self.0.mean() / scale,
                self.0.stdev() / scale,
                self.0.max() as f64 / scale,
            )
        };
        let _ = writeln!(out, "#[Mean    = {mean:12.3}, StdDeviation   = {sd:12.3}]");
        let _ = writeln!(
            out,
            "#[Max     = {max:12.3}, Total count    = {:12}]",
            self.0.len()
        );
        let _ = writeln!(
            out,
            "#[Buckets = {:12}, SubBuckets     = {:12}]",
            self.0.buckets(),
            sub_buckets()
        );
        out
    }
}

/// Sub-buckets per bucket, as HdrHistogram's Java implementation reports them: the power of
/// two that holds `2 * 10^SIGFIG` values.
fn sub_buckets() -> u64 {
    (2 * 10u64.pow(u32::from(SIGFIG))).next_power_of_two()
}

/// Histograms travel inside the workers' JSON lines as base64 strings.
impl Serialize for Hist {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for Hist {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Hist::from_base64(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_equals_recording_everything_in_one() {
        let mut a = Hist::new();
        let mut b = Hist::new();
        let mut all = Hist::new();
        for v in 1..=1000u64 {
            a.record(v);
            all.record(v);
        }
        for v in (1..=200u64).map(|x| x * 997) {
            b.record(v);
            all.record(v);
        }
        let mut merged = a.clone();
        merged.merge(&b).unwrap();
        assert_eq!(merged.len(), 1200);
        assert_eq!(merged.percentiles(), all.percentiles());
        assert_eq!(merged.max(), all.max());
        // Merge through the wire form, as the coordinator does with workers' histograms.
        let mut via_wire = Hist::from_base64(&a.to_base64()).unwrap();
        via_wire
            .merge(&Hist::from_base64(&b.to_base64()).unwrap())
            .unwrap();
        assert_eq!(via_wire.percentiles(), all.percentiles());
        // And through serde (JSON string).
        let json = serde_json::to_string(&merged).unwrap();
        let back: Hist = serde_json::from_str(&json).unwrap();
        assert_eq!(back.percentiles(), all.percentiles());
    }

    #[test]
    fn empty_and_clamped_values() {
        let mut h = Hist::new();
        assert_eq!(h.percentiles(), Percentiles::default());
        assert!(Hist::from_base64(&h.to_base64()).unwrap().is_empty());
        h.record(0);
        h.record(u64::MAX);
        assert_eq!(h.len(), 2);
        assert_eq!(h.quantile(0.0), 1);
        assert!(h.max() >= HIGHEST_US && h.max() <= HIGHEST_US + HIGHEST_US / 1000);
        assert!(Hist::from_base64("not base64!").is_err());
        assert!(Hist::from_base64("AAAA").is_err());
    }

    #[test]
    fn hgrm_has_the_standard_shape() {
        let mut h = Hist::new();
        for v in 1..=10_000u64 {
            h.record(v);
        }
        let text = h.write_hgrm(1000.0);
        let mut lines = text.lines();
        assert_eq!(
            lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
            ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"]
        );
        assert_eq!(lines.next().unwrap(), "");
        let rows: Vec<Vec<&str>> = text
            .lines()
            .skip(2)
            .take_while(|l| !l.starts_with('#'))
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert!(rows.len() > 20);
        // First row: the smallest value (ms) at percentile 0; last row: 100% with the total.
        assert_eq!(rows[0][0], "0.001");
        let last = rows.last().unwrap();
        assert_eq!(last.len(), 3);
        assert_eq!(last[1], "1.000000000000");
        assert_eq!(last[2], "10000");
        // Cumulative counts never decrease.
        let counts: Vec<u64> = rows.iter().map(|r| r[2].parse().unwrap()).collect();
        assert!(counts.windows(2).all(|w| w[0] <= w[1]));
        assert!(text.contains("#[Max     =       10.007, Total count    =        10000]"));
        assert!(text.contains("SubBuckets     =         2048]"));
    }
}
