//! The I/O-free core: readings folded into fixed time buckets, one open bucket per active series,
//! and what must be written to disk at the next flush.
//!
//! A series is one property of one device. Time is cut into buckets of `resolution_ms`, aligned
//! to the Unix epoch; a bucket keeps the minimum, maximum, sum, count and last value of the
//! readings that fell in it (a downsampled point). Only the bucket of the newest reading is
//! open; a reading older than it is late and is not taken (counted by the caller), so a point
//! once closed never changes.
//!
//! A series that is not open (after a restart, or once it went idle and was forgotten) is opened
//! from the stored point of its reading's bucket, if there is one, which the caller reads for
//! [`Recorder::record`]: so the point written next holds the readings from before too.

use std::collections::HashMap;

use serde::Serialize;

/// One downsampled point: the readings of one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    /// Start of the bucket, ms since the Unix epoch.
    pub t: i64,
    /// Smallest reading.
    pub min: f64,
    /// Largest reading.
    pub max: f64,
    /// Sum of the readings (`avg` = `sum / count`).
    #[serde(skip)]
    pub sum: f64,
    /// The reading with the latest time in the bucket.
    pub last: f64,
    /// How many readings.
    pub count: u32,
}

impl Point {
    /// The point of a bucket starting at `t` with one reading.
    pub fn first(t: i64, v: f64) -> Point {
        Point {
            t,
            min: v,
            max: v,
            sum: v,
            last: v,
            count: 1,
        }
    }

    /// Mean of the readings.
    pub fn avg(&self) -> f64 {
        if self.count == 0 {
            self.last
        } else {
            self.sum / f64::from(self.count)
        }
    }

    fn add(&mut self, v: f64) {
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.sum += v;
        self.last = v;
        self.count = self.count.saturating_add(1);
    }
}

/// How the history is cut and bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Bucket width, ms (at least 1).
    pub resolution_ms: i64,
    /// Points older than this (from the newest reading's time) are removed, ms.
    pub retention_ms: i64,
    /// Most series open at once; a reading of a new series past it is refused.
    pub max_series: usize,
}

impl Settings {
    /// Start of the bucket holding `t`.
    pub fn bucket_of(&self, t: i64) -> i64 {
        t - t.rem_euclid(self.resolution_ms.max(1))
    }

    /// Most points one series keeps.
    pub fn points_per_series(&self) -> i64 {
        self.retention_ms / self.resolution_ms.max(1)
    }
}

/// What became of a reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Folded into its bucket.
    Taken,
    /// Older than the series' open bucket: not taken.
    Late,
    /// A new series while `max_series` are open: not taken.
    SeriesLimit,
    /// NaN or infinite: not taken.
    NotFinite,
}

/// A series' name: device and property.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    /// The device id.
    pub device: String,
    /// The property name.
    pub property: String,
}

/// A point to write (it replaces what is stored for its bucket).
#[derive(Debug, Clone, PartialEq)]
pub struct Dirty {
    /// The series.
    pub key: SeriesKey,
    /// The point: every reading of its bucket.
    pub point: Point,
}

#[derive(Debug)]
struct Open {
    point: Point,
    /// Changed since the last flush.
    dirty: bool,
}

/// The open buckets of all active series, and the closed ones not yet written.
#[derive(Debug)]
pub struct Recorder {
    settings: Settings,
    open: HashMap<SeriesKey, Open>,
    closed: Vec<Dirty>,
}

impl Recorder {
    /// An empty recorder.
    pub fn new(settings: Settings) -> Recorder {
        Recorder {
            settings,
            open: HashMap::new(),
            closed: Vec::new(),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Series open now.
    pub fn open_series(&self) -> usize {
        self.open.len()
    }

    /// Folds the reading `v` of `device`'s `property` at `t` (ms) into its bucket. A series that
    /// is not open is opened from `stored(bucket start)`: the point already on disk for that
    /// bucket, if any.
    pub fn record(
        &mut self,
        device: &str,
        property: &str,
        t: i64,
        v: f64,
        stored: impl FnOnce(i64) -> Option<Point>,
    ) -> Recorded {
        if !v.is_finite() {
            return Recorded::NotFinite;
        }
        let bucket = self.settings.bucket_of(t);
        let key = SeriesKey {
            device: device.to_owned(),
            property: property.to_owned(),
        };
        let open = self.open.len();
        match self.open.get_mut(&key) {
            Some(o) if bucket == o.point.t => {
                o.point.add(v);
                o.dirty = true;
                Recorded::Taken
            }
            Some(o) if bucket > o.point.t => {
                if o.dirty {
                    self.closed.push(Dirty {
                        key,
                        point: o.point,
                    });
                }
                *o = Open {
                    point: Point::first(bucket, v),
                    dirty: true,
                };
                Recorded::Taken
            }
            Some(_) => Recorded::Late,
            None if open >= self.settings.max_series => Recorded::SeriesLimit,
            None => {
                let point = match stored(bucket) {
                    Some(mut p) if p.t == bucket => {
                        p.add(v);
                        p
                    }
                    _ => Point::first(bucket, v),
                };
                self.open.insert(key, Open { point, dirty: true });
                Recorded::Taken
            }
        }
    }

    /// The points to write now: closed buckets not yet written, and every open bucket that
    /// changed. Marks them written; call [`Recorder::unflushed`] if the write then fails. Open
    /// series whose bucket ended before `now - resolution` and that are written are forgotten
    /// (memory follows the active series), to be reopened from disk by their next reading.
    pub fn take_dirty(&mut self, now: i64) -> Vec<Dirty> {
        let mut out = std::mem::take(&mut self.closed);
        let idle_before = self.settings.bucket_of(now) - self.settings.resolution_ms;
        self.open.retain(|key, o| {
            if o.dirty {
                out.push(Dirty {
                    key: key.clone(),
                    point: o.point,
                });
                o.dirty = false;
                return true;
            }
            o.point.t >= idle_before
        });
        out
    }

    /// Puts back points that [`Recorder::take_dirty`] gave out and that could not be written,
    /// so the next flush tries them again. A series that moved on meanwhile keeps its newer
    /// bucket; the older point goes with the closed ones.
    pub fn unflushed(&mut self, points: Vec<Dirty>) {
        for d in points {
            match self.open.get_mut(&d.key) {
                Some(o) if o.point.t == d.point.t => o.dirty = true,
                _ => self.closed.push(d),
            }
        }
    }

    /// `stored` (a series' points from disk since some time, in time order) with what this
    /// recorder has not written yet laid over it: what a reader should see now.
    pub fn overlay(&self, key: &SeriesKey, mut stored: Vec<Point>, since: i64) -> Vec<Point> {
        let pending = self
            .closed
            .iter()
            .filter(|d| d.key == *key)
            .map(|d| d.point)
            .chain(self.open.get(key).filter(|o| o.dirty).map(|o| o.point));
        for p in pending {
            if p.t + self.settings.resolution_ms <= since {
                continue;
            }
            match stored.binary_search_by_key(&p.t, |s| s.t) {
                Ok(i) => stored[i] = p,
                Err(i) => stored.insert(i, p),
            }
        }
        stored
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn settings() -> Settings {
        Settings {
            resolution_ms: 1000,
            retention_ms: 60_000,
            max_series: 3,
        }
    }

    fn key(d: &str, p: &str) -> SeriesKey {
        SeriesKey {
            device: d.into(),
            property: p.into(),
        }
    }

    fn none(_: i64) -> Option<Point> {
        None
    }

    #[test]
    fn readings_of_one_bucket_make_one_point_with_min_max_avg_last() {
        let mut r = Recorder::new(settings());
        for (t, v) in [(10_100, 3.0), (10_200, 1.0), (10_900, 5.0)] {
            assert_eq!(r.record("d", "p", t, v, none), Recorded::Taken);
        }
        let out = r.take_dirty(10_950);
        assert_eq!(out.len(), 1);
        let p = out[0].point;
        assert_eq!(
            (p.t, p.min, p.max, p.last, p.count),
            (10_000, 1.0, 5.0, 5.0, 3)
        );
        assert_eq!(p.avg(), 3.0);
        assert!(r.take_dirty(10_950).is_empty(), "written once");
    }

    #[test]
    fn a_reading_in_a_later_bucket_closes_the_open_one() {
        let mut r = Recorder::new(settings());
        r.record("d", "p", 1_000, 1.0, none);
        r.record("d", "p", 2_500, 2.0, none);
        let ts: Vec<i64> = r.take_dirty(2_600).iter().map(|d| d.point.t).collect();
        assert_eq!(ts, vec![1_000, 2_000]);
    }

    #[test]
    fn a_series_reopened_in_a_stored_bucket_continues_its_point() {
        let mut r = Recorder::new(settings());
        let stored = Point::first(1_000, 8.0);
        r.record("d", "p", 1_500, 2.0, |b| (b == 1_000).then_some(stored));
        let p = r.take_dirty(1_600)[0].point;
        assert_eq!((p.count, p.min, p.max, p.last), (2, 2.0, 8.0, 2.0));
        // A stored point of another bucket is not this one's.
        let mut r = Recorder::new(settings());
        r.record("d", "p", 2_500, 2.0, |_| Some(stored));
        assert_eq!(r.take_dirty(2_600)[0].point.count, 1);
    }

    #[test]
    fn late_readings_and_non_finite_values_are_not_taken() {
        let mut r = Recorder::new(settings());
        r.record("d", "p", 5_000, 1.0, none);
        assert_eq!(r.record("d", "p", 4_999, 9.0, none), Recorded::Late);
        assert_eq!(
            r.record("d", "p", 5_001, f64::NAN, none),
            Recorded::NotFinite
        );
        assert_eq!(
            r.record("d", "p", 5_001, f64::INFINITY, none),
            Recorded::NotFinite
        );
        assert_eq!(r.take_dirty(5_100)[0].point.count, 1);
    }

    #[test]
    fn series_past_the_limit_are_refused_until_an_idle_one_is_forgotten() {
        let mut r = Recorder::new(settings());
        for p in ["a", "b", "c"] {
            assert_eq!(r.record("d", p, 1_000, 1.0, none), Recorded::Taken);
        }
        assert_eq!(r.record("d", "x", 1_000, 1.0, none), Recorded::SeriesLimit);
        r.take_dirty(1_100);
        assert_eq!(r.open_series(), 3, "recent series stay open");
        r.take_dirty(10_000);
        assert_eq!(r.open_series(), 0, "idle and written: forgotten");
        assert_eq!(r.record("d", "x", 10_000, 1.0, none), Recorded::Taken);
    }

    #[test]
    fn a_failed_write_is_given_out_again() {
        let mut r = Recorder::new(settings());
        r.record("d", "p", 1_000, 1.0, none);
        let out = r.take_dirty(1_100);
        r.record("d", "p", 3_000, 2.0, none);
        r.unflushed(out);
        let ts: Vec<i64> = r.take_dirty(3_100).iter().map(|d| d.point.t).collect();
        assert_eq!(ts, vec![1_000, 3_000]);
    }

    #[test]
    fn overlay_lays_pending_points_over_the_stored_ones() {
        let mut r = Recorder::new(settings());
        let k = key("d", "p");
        let stored = vec![Point::first(1_000, 10.0), Point::first(2_000, 20.0)];
        r.record("d", "p", 2_100, 30.0, |_| Some(Point::first(2_000, 20.0)));
        r.record("d", "p", 3_100, 40.0, none);
        let seen = r.overlay(&k, stored, 0);
        let got: Vec<(i64, u32)> = seen.iter().map(|p| (p.t, p.count)).collect();
        assert_eq!(got, vec![(1_000, 1), (2_000, 2), (3_000, 1)]);
        // A bucket ending at or before `since` is left out.
        assert_eq!(r.overlay(&k, vec![], 3_000).len(), 1);
    }

    proptest! {
        /// Whatever the order of flushes and of series forgotten and reopened, what a reader
        /// sees (stored points overlaid with pending ones) is the readings folded per bucket:
        /// no reading counted twice or lost.
        #[test]
        fn stored_and_pending_points_add_up_to_the_readings(
            steps in proptest::collection::vec((0i64..2_500, -100.0f64..100.0, any::<bool>()), 1..80),
        ) {
            let mut r = Recorder::new(settings());
            let k = key("d", "p");
            let mut disk: std::collections::BTreeMap<i64, Point> = Default::default();
            let mut t = 0;
            let mut expect: std::collections::BTreeMap<i64, (u32, f64)> = Default::default();
            for (gap, v, flush) in steps {
                t += gap;
                let got = r.record("d", "p", t, v, |b| disk.get(&b).copied());
                prop_assert_eq!(got, Recorded::Taken);
                let e = expect.entry(settings().bucket_of(t)).or_insert((0, 0.0));
                e.0 += 1;
                e.1 += v;
                if flush {
                    for d in r.take_dirty(t + gap) {
                        disk.insert(d.point.t, d.point);
                    }
                }
            }
            let seen = r.overlay(&k, disk.into_values().collect(), 0);
            let got: Vec<(i64, u32)> = seen.iter().map(|p| (p.t, p.count)).collect();
            let want: Vec<(i64, u32)> = expect.iter().map(|(t, (n, _))| (*t, *n)).collect();
            prop_assert_eq!(got, want);
            for p in &seen {
                prop_assert!((p.sum - expect[&p.t].1).abs() < 1e-6);
            }
        }
    }
}
