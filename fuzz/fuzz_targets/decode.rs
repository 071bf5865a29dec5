//! Any bytes, as a plain event, a CloudEvent, a batch item or a void: the decoder never panics and
//! never allocates without bound (libFuzzer's `-rss_limit_mb` enforces the second), and whatever it
//! accepts re-encodes to JSON that decodes to the same event.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meterflow_model::{decode_as, split_batch, Format, Limits};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let now = 1_705_329_000_000_000;
    for format in [Format::Plain, Format::CloudEvent] {
        if let Ok(event) = decode_as(format, data, now, &limits) {
            let again = decode_as(Format::Plain, &event.to_json(), now, &limits)
                .expect("an accepted event re-encodes to a valid one");
            assert_eq!(again, event);
        }
    }
    if let Ok(items) = split_batch(data) {
        for item in items {
            let _ = decode_as(Format::Plain, item.get().as_bytes(), now, &limits);
        }
    }
});
