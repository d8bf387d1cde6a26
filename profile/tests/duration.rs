//! Durations are written back in a form that reads back as the same duration.
#![allow(clippy::unwrap_used, missing_docs)]

use edgetwin_profile::Duration;
use proptest::prelude::*;

proptest! {
    #[test]
    fn duration_round_trips_through_its_string_form(secs in 0u64..10_000_000_000, nanos in 0u32..1_000_000_000) {
        let d = Duration::from(std::time::Duration::new(secs, nanos));
        let text = d.to_string();
        prop_assert_eq!(text.parse::<Duration>().unwrap(), d, "{}", text);
    }

    #[test]
    fn duration_round_trips_through_yaml_and_json(ms in 0u64..100_000_000) {
        let d = Duration::from_millis(ms);
        let yaml = serde_norway::to_string(&d).unwrap();
        prop_assert_eq!(serde_norway::from_str::<Duration>(&yaml).unwrap(), d);
        let json = serde_json::to_string(&d).unwrap();
        prop_assert_eq!(serde_json::from_str::<Duration>(&json).unwrap(), d);
    }
}

#[test]
fn duration_rejects_bare_numbers_in_yaml_with_a_hint() {
    let e = serde_norway::from_str::<Duration>("5").unwrap_err();
    assert!(
        e.to_string().contains("has no unit: write e.g. \"5s\""),
        "{e}"
    );
}
