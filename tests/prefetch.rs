//! The read path below FUSE, against the real server: what a sequential and a random reader
//! cost in GET requests and bytes, and that every byte matches the source.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use keepfs::cache::{BLOCK_SIZE, MemoryCache};
use keepfs::prefetch::{BlockFetcher, FileReader, ObjectVersion, PrefetchConfig};
use keepfs::store::{ObjectStore, S3Store};

use common::{pattern, rt, server, sha256};

struct Fixture {
    fetcher: Arc<BlockFetcher<S3Store>>,
    object: ObjectVersion,
    data: Vec<u8>,
}

fn fixture(label: &str, size: usize, cache: u64) -> Fixture {
    let s = server();
    let bucket = s.bucket(label);
    let data = pattern(size, size as u64);
    s.put(&bucket, "obj", &data);
    let store = Arc::new(S3Store::from_client(s.client().clone(), &bucket));
    let meta = rt().block_on(store.head("obj")).unwrap();
    assert_eq!(meta.size, size as u64);
    let fetcher = Arc::new(BlockFetcher::new(store, MemoryCache::new(cache)));
    let object = ObjectVersion {
        key: "obj".into(),
        etag: meta.etag.into(),
        size: meta.size,
    };
    Fixture {
        fetcher,
        object,
        data,
    }
}

impl Fixture {
    fn reader(&self) -> FileReader<S3Store> {
        FileReader::new(
            self.fetcher.clone(),
            self.object.clone(),
            PrefetchConfig::default(),
        )
    }

    fn gets(&self) -> u64 {
        self.fetcher.stats.get_requests.load(Ordering::Relaxed)
    }

    fn fetched(&self) -> u64 {
        self.fetcher.stats.bytes_fetched.load(Ordering::Relaxed)
    }
}

#[test]
fn sequential_reader_gets_a_growing_window_of_large_gets() {
    let f = fixture("seq", 48 << 20, 1 << 30);
    let reader = f.reader();
    let mut out = Vec::new();
    rt().block_on(async {
        let mut offset = 0u64;
        loop {
            let chunk = reader.read(offset, 1 << 20).await.unwrap();
            if chunk.is_empty() {
                break;
            }
            offset += chunk.len() as u64;
            out.extend_from_slice(&chunk);
        }
    });
    assert_eq!(sha256(&out), sha256(&f.data));
    // Every byte fetched exactly once, in few requests: the window doubles from 1 MiB and is
    // cut into GETs of at most 8 MiB, so 48 MiB needs about a dozen.
    assert_eq!(f.fetched(), f.data.len() as u64);
    assert!(f.gets() <= 16, "{} GETs for 48 MiB", f.gets());
    assert!(
        f.gets() >= 6,
        "{} GETs: the 8 MiB request cap was not applied",
        f.gets()
    );

    // A second reader of the same version is served from the memory cache.
    let before = f.gets();
    let again = rt().block_on(f.reader().read(5 << 20, 1 << 20)).unwrap();
    assert_eq!(again, f.data[5 << 20..6 << 20]);
    assert_eq!(f.gets(), before, "cached blocks must not be fetched again");
}

#[test]
fn random_reader_fetches_only_what_it_touches() {
    use rand::{Rng, SeedableRng};
    let f = fixture("random", 48 << 20, 1 << 30);
    let reader = f.reader();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let reads = 40u64;
    rt().block_on(async {
        for _ in 0..reads {
            let offset = rng.random_range(1..f.data.len() as u64 - 8192);
            let got = reader.read(offset, 4096).await.unwrap();
            let o = offset as usize;
            assert_eq!(got, f.data[o..o + 4096], "at {offset}");
        }
    });
    // Each 4 KiB read touches at most two blocks; nothing is prefetched for random access.
    assert!(
        f.fetched() <= reads * 2 * BLOCK_SIZE,
        "random reads fetched {} bytes",
        f.fetched()
    );
}

#[test]
fn reads_past_the_end_and_without_cache() {
    let f = fixture("edges", (3 << 20) + 17, 0);
    let reader = f.reader();
    rt().block_on(async {
        assert!(
            reader
                .read(f.data.len() as u64, 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(reader.read(u64::MAX - 5, 10).await.unwrap().is_empty());
        let tail = reader.read(f.data.len() as u64 - 7, 4096).await.unwrap();
        assert_eq!(tail, f.data[f.data.len() - 7..]);
        // With the cache disabled, reads still work (each block fetched when needed).
        let all = reader.read(0, u32::MAX).await.unwrap();
        assert_eq!(sha256(&all), sha256(&f.data));
    });
}

#[test]
fn concurrent_random_reads_on_one_handle_survive_aborted_gets() {
    use rand::{Rng, SeedableRng};
    // Each read that is not sequential aborts the GETs the handle started before, while other
    // reads of the same handle may be waiting for them: every read must still get its bytes.
    let f = fixture("aborts", 16 << 20, 0);
    let reader = Arc::new(f.reader());
    let data = Arc::new(f.data.clone());
    rt().block_on(async {
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let (reader, data) = (reader.clone(), data.clone());
            tasks.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                for _ in 0..40 {
                    let offset = rng.random_range(0..data.len() as u64 - 300_000);
                    let len = rng.random_range(1..300_000u32);
                    let got = reader.read(offset, len).await.expect("read");
                    let o = offset as usize;
                    assert_eq!(
                        sha256(&got),
                        sha256(&data[o..o + len as usize]),
                        "at {offset}+{len}"
                    );
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}
