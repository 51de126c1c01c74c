//! Hash-chain computation: content hash + record hash of a 256-byte record (SPEC §5.1).
//! `cargo bench --bench chain`; CI runs it once as a smoke test via `cargo test --benches`.

use std::collections::BTreeMap;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use webpods_engine::hash::{HashInput, content_hash, record_hash};

fn chain(c: &mut Criterion) {
    let content = vec![b'x'; 256];
    let headers = BTreeMap::new();
    let mut group = c.benchmark_group("hash_chain");
    group.throughput(Throughput::Elements(1));
    group.bench_function("record_256B", |b| {
        let mut prev = String::from("sha256:0000");
        let mut index = 0i64;
        b.iter(|| {
            let ch = content_hash(&content);
            prev = record_hash(&HashInput {
                pod: "alice",
                stream: "bench/stream",
                index,
                name: "record",
                content_type: "text/plain",
                content_hash: &ch,
                headers: &headers,
                deleted: false,
                user_id: "11111111-2222-3333-4444-555555555555",
                timestamp: 1_735_689_600_000 + index,
                previous_hash: Some(&prev),
            });
            index += 1;
        });
    });
    group.finish();
}

criterion_group!(benches, chain);
criterion_main!(benches);
