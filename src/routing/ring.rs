//! The consistent-hash ring: which member (backend) owns a device ID.
//!
//! Placement is ketama as done by nginx's `hash $key consistent`
//! (`ngx_http_upstream_update_chash`), with crc32 throughout:
//!
//! * Each member has identity bytes (its stable id, or nginx's `host\0port`)
//!   and a weight. It gets `weight × replicas` points on a ring of `u32`.
//! * `base` = crc32 state fed the identity bytes. Point `j` is
//!   `crc32(base ‖ prev.to_le_bytes())`, where `prev` is 0 for the first point
//!   and then the previous point's hash (a chain, not a counter).
//! * Points are sorted by hash and of equal hashes only the first is kept.
//!   Which is first is the [`Ties`] rule: the smaller identity (then the
//!   earlier member), so the ring does not depend on the order members are
//!   listed in; or, as nginx does, the member listed first.
//! * A key belongs to the first point with `hash >= crc32(key)`, wrapping
//!   around to the first point.
//!
//! Adding a member therefore only moves keys *to* it, and removing one only
//! moves *its* keys, each to the next distinct member along the ring — the
//! second element of [`Ring::walk`]. (The one exception: a removed point
//! that hid another member's point of the very same hash reveals it.)
//!
//! Layout: a point's hash is split into its high 16 bits, which select a
//! bucket of a fixed 65,536-entry index, and its low 16 bits, which are
//! binary-searched within the bucket. Each point is one `u32` slot,
//! `low16 << 16 | owner`, so the owner sits next to the hash that found it.
//! Four bytes per point keeps 1,000 backends × 2,048 points in 8 MiB; see
//! `docs/ring-measurements.md` for the layouts measured.
//!
//! Building is a radix sort rather than a comparison sort, and point hashes
//! come from a small crc table rather than crc32fast; both give exactly the
//! placement above (see [`Ring::new`] and `docs/ring-measurements.md`).

use std::fmt;

/// Points per unit of weight. Chosen by measurement (see
/// `docs/ring-measurements.md`, `examples/ring_spread.rs`): with 10 equal
/// members and 10,000 random IDs the busiest member stays within 1.10× the
/// mean. (nginx uses 160.)
pub const DEFAULT_REPLICAS: u32 = 2048;

/// Upper bound on the total number of points (128 MiB of ring). If the
/// members' `weight × replicas` add up to more, every member's count is
/// scaled down in proportion, so weights keep their ratios.
pub const MAX_POINTS: u32 = 1 << 25;

/// Most members a ring holds (owners are stored as `u16`); members past
/// this index are ignored (config validation is expected to reject them).
pub const MAX_MEMBERS: usize = 1 << 16;

/// Points per unit of weight in nginx's `hash … consistent`.
pub const NGINX_REPLICAS: u32 = 160;

/// Which point survives when points of different members have equal hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ties {
    /// The member with the smaller identity, then the earlier member: the
    /// ring does not depend on member order.
    SmallerIdentity,
    /// The earlier member, as nginx's sort (glibc's stable merge sort over
    /// points generated in `server` order) leaves it. Verified against real
    /// nginx by `tests/nginx/compare.sh`.
    FirstListed,
}

/// nginx's identity bytes for an upstream `server` written as `server`:
/// `host`, a NUL, then `port`, split as `ngx_http_upstream_update_chash`
/// does. `unix:PATH` (any case) hashes PATH with an empty port; otherwise
/// the port is whatever follows the last `:` when only digits follow it,
/// and empty when nothing does (`[::1]` keeps its brackets).
pub fn nginx_identity(server: &str) -> Vec<u8> {
    let s = server.as_bytes();
    let (host, port) = if s.len() >= 5 && s[..5].eq_ignore_ascii_case(b"unix:") {
        (&s[5..], &s[..0])
    } else {
        let digits = s.iter().rev().take_while(|b| b.is_ascii_digit()).count();
        match s.len().checked_sub(digits + 1) {
            Some(colon) if s[colon] == b':' => (&s[..colon], &s[colon + 1..]),
            _ => (s, &s[..0]),
        }
    };
    [host, b"\0", port].concat()
}

/// One ring member as given to [`Ring::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member<'a> {
    /// Stable identity bytes, e.g. the backend id `b"app-1"`.
    pub identity: &'a [u8],
    /// Relative weight; 0 means no points (never owns anything).
    pub weight: u32,
}

/// An immutable consistent-hash ring. Members are referred to by their
/// index in the slice given to [`Ring::new`].
#[derive(Clone)]
pub struct Ring {
    /// Points `index[b]..index[b + 1]` have hashes with high half `b`
    /// (65,537 entries).
    index: Vec<u32>,
    /// One slot per point, in ascending hash order: the low half of the
    /// point's hash in the high 16 bits, the owning member in the low 16.
    slots: Vec<u32>,
    /// Number of members given (including those without points).
    members: usize,
    /// Number of distinct members that own at least one point.
    live: usize,
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("members", &self.members)
            .field("live", &self.live)
            .field("points", &self.slots.len())
            .finish_non_exhaustive()
    }
}

/// crc32 (IEEE, reflected) slicing-by-4 tables, built at compile time:
/// `CRC_TABLES[k][b]` is the crc register after byte `b` then `k` zero bytes.
const CRC_TABLES: [[u32; 256]; 4] = crc_tables();

const fn crc_tables() -> [[u32; 256]; 4] {
    let mut t = [[0u32; 256]; 4];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut bit = 0;
        while bit < 8 {
            c = if c & 1 == 1 { 0xEDB8_8320 ^ c >> 1 } else { c >> 1 };
            bit += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut k = 1;
    while k < 4 {
        let mut i = 0;
        while i < 256 {
            let c = t[k - 1][i];
            t[k][i] = c >> 8 ^ t[0][(c & 0xff) as usize];
            i += 1;
        }
        k += 1;
    }
    t
}

/// The linear part of feeding 4 bytes (`x.to_le_bytes()`) to a crc32
/// register: one slicing-by-4 step, four lookups in 4 KiB of tables.
#[inline]
fn crc_feed4(x: u32) -> u32 {
    let t = &CRC_TABLES;
    t[3][(x & 0xff) as usize]
        ^ t[2][(x >> 8 & 0xff) as usize]
        ^ t[1][(x >> 16 & 0xff) as usize]
        ^ t[0][(x >> 24) as usize]
}

/// The chained point hashes of one member: `count` of them, computed the
/// straightforward way. This is the definition; the build computes the same
/// hashes with [`for_each_point`].
#[cfg(test)]
fn point_hashes(identity: &[u8], count: u32) -> impl Iterator<Item = u32> {
    let mut base = crc32fast::Hasher::new();
    base.update(identity);
    let mut prev: u32 = 0;
    (0..count).map(move |_| {
        let mut h = base.clone();
        h.update(&prev.to_le_bytes());
        prev = h.finalize();
        prev
    })
}

/// A member's first point: crc32 of its identity then four zero bytes.
///
/// crc32 is affine in its input, so with the identity fixed every point is
/// `crc32(identity ‖ prev) = first_point(identity) ^ crc_feed4(prev)`:
/// bit-identical to cloning a crc32fast state and feeding it `prev` (see
/// `tests::crc_feed4_matches_crc32fast`), at the cost of four table lookups
/// instead of a call into crc32fast, which is built for long inputs.
fn first_point(identity: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(identity);
    h.update(&[0; 4]);
    h.finalize()
}

/// One member's point chain while [`for_each_point`] walks it.
#[derive(Clone, Copy, Default)]
struct Chain {
    first: u32,
    prev: u32,
    left: u32,
    rank: u32,
}

/// Calls `each(hash, rank)` for every point of every chain, where
/// `chains[rank]` is `(first_point, count)` (see [`first_point`]). Four
/// chains advance side by side: each step waits on the previous step's
/// lookups, and interleaving independent chains lets the CPU overlap them
/// (measured 5× faster than one chain at a time). So calls do not come in
/// rank order, but each chain's come in chain order.
fn for_each_point(chains: &[(u32, u32)], mut each: impl FnMut(u32, u32)) {
    let mut queue = (0u32..).zip(chains).filter(|(_, &(_, count))| count > 0).map(|(rank, &(first, count))| Chain {
        first,
        prev: 0,
        left: count,
        rank,
    });
    // A lane with `left == 0` is idle.
    let mut lanes = [Chain::default(); 4];
    loop {
        for lane in lanes.iter_mut().filter(|l| l.left == 0) {
            if let Some(chain) = queue.next() {
                *lane = chain;
            }
        }
        let steps = lanes.iter().map(|l| l.left).min().unwrap_or(0);
        if steps == 0 {
            break; // the queue is empty and a lane is idle
        }
        for _ in 0..steps {
            for lane in &mut lanes {
                lane.prev = lane.first ^ crc_feed4(lane.prev);
                each(lane.prev, lane.rank);
            }
        }
        for lane in &mut lanes {
            lane.left -= steps;
        }
    }
    // Fewer than four chains are left: finish them one at a time.
    for mut lane in lanes {
        for _ in 0..lane.left {
            lane.prev = lane.first ^ crc_feed4(lane.prev);
            each(lane.prev, lane.rank);
        }
    }
}

/// Sorts one region's points (those sharing the top 8 hash bits) by hash,
/// reusing its buffers from region to region. A region of a 2M-point ring
/// holds about 8K points, so the whole sort stays in L2 cache.
struct RegionSorter {
    /// `hash << 16 | rank` per point, sorted on return.
    keys: Vec<u64>,
    tmp: Vec<u64>,
    /// Histograms of hash bits 0..12 and 12..24, then their start offsets.
    counts: [[u32; 1 << 12]; 2],
}

impl RegionSorter {
    /// Below this many points a comparison sort beats clearing and summing
    /// two 4,096-entry histograms (small rings have small regions).
    const RADIX_MIN: usize = 512;

    fn new() -> Self {
        RegionSorter { keys: Vec::new(), tmp: Vec::new(), counts: [[0; 1 << 12]; 2] }
    }

    /// The region's points as `hash << 16 | rank`, ordered by hash; points
    /// of equal hash are adjacent but in no particular rank order.
    fn sort(&mut self, hashes: &[u32], ranks: &[u16]) -> &[u64] {
        let key = |(&h, &r): (&u32, &u16)| u64::from(h) << 16 | u64::from(r);
        self.keys.clear();
        if hashes.len() < Self::RADIX_MIN {
            self.keys.extend(hashes.iter().zip(ranks).map(key));
            self.keys.sort_unstable();
            return &self.keys;
        }
        // LSD radix sort on the low 24 bits of the hash, 12 bits a pass;
        // the top 8 are the same for the whole region.
        let digit = |h: u32, pass: usize| (h >> (12 * pass) & 0xfff) as usize;
        self.counts = [[0; 1 << 12]; 2];
        for &h in hashes {
            self.counts[0][digit(h, 0)] += 1;
            self.counts[1][digit(h, 1)] += 1;
        }
        for counts in &mut self.counts {
            let mut start = 0;
            for c in counts.iter_mut() {
                (*c, start) = (start, start + *c);
            }
        }
        self.tmp.resize(hashes.len(), 0);
        self.keys.resize(hashes.len(), 0);
        for (h, r) in hashes.iter().zip(ranks) {
            let next = &mut self.counts[0][digit(*h, 0)];
            self.tmp[*next as usize] = key((h, r));
            *next += 1;
        }
        for &k in &self.tmp {
            let next = &mut self.counts[1][digit((k >> 16) as u32, 1)];
            self.keys[*next as usize] = k;
            *next += 1;
        }
        &self.keys
    }
}

/// Points per member: `weight × replicas`, all scaled down in proportion if
/// they add up to more than [`MAX_POINTS`].
fn point_counts(members: &[Member<'_>], replicas: u32) -> Vec<u32> {
    let wanted = |m: &Member| u128::from(m.weight) * u128::from(replicas);
    let sum: u128 = members.iter().map(wanted).sum();
    let cap = u128::from(MAX_POINTS);
    let scale = |n: u128| if sum <= cap { n } else { n * cap / sum };
    members.iter().map(|m| scale(wanted(m)) as u32).collect()
}

impl Ring {
    /// Builds the ring. Members are referred to by their index in `members`
    /// (at most [`MAX_MEMBERS`]; later ones are ignored). Each gets
    /// `weight × replicas` points, scaled down if needed (see [`MAX_POINTS`]).
    pub fn new(members: &[Member<'_>], replicas: u32) -> Ring {
        Ring::with_ties(members, replicas, Ties::SmallerIdentity)
    }

    /// [`Ring::new`] with a choice of tie rule; `Ring::with_ties(members,
    /// NGINX_REPLICAS, Ties::FirstListed)` over [`nginx_identity`]s is
    /// nginx's ring.
    pub fn with_ties(members: &[Member<'_>], replicas: u32, ties: Ties) -> Ring {
        let members = &members[..members.len().min(MAX_MEMBERS)];
        let counts = point_counts(members, replicas);
        // Members with points in tie order: by identity, equal identities in
        // member order (the sort is stable), or just member order. A
        // member's position here is its rank; at most MAX_MEMBERS of them,
        // so a rank fits in a u16.
        let mut by_rank: Vec<usize> = (0..members.len()).filter(|&m| counts[m] > 0).collect();
        if ties == Ties::SmallerIdentity {
            by_rank.sort_by_key(|&m| members[m].identity);
        }
        let chains: Vec<(u32, u32)> = by_rank.iter().map(|&m| (first_point(members[m].identity), counts[m])).collect();
        // At most MAX_POINTS (2^25), so positions fit in a u32.
        let total: usize = counts.iter().map(|&c| c as usize).sum();

        // Sorting 2M points with a comparison sort was most of the build, so
        // instead: (1) count the points in each of 256 regions (top 8 bits
        // of the hash); (2) generate them again and place each in its region
        // (256 write streams, cache-friendly, unlike 65,536); (3) radix-sort
        // each region in cache and write it back deduplicated. Generating
        // twice is cheaper than keeping the hashes: fresh memory costs page
        // faults.
        let mut region = [0u32; 257];
        for_each_point(&chains, |h, _| region[(h >> 24) as usize + 1] += 1);
        for r in 1..region.len() {
            region[r] += region[r - 1];
        }
        let mut slots = vec![0u32; total];
        let mut ranks = vec![0u16; total];
        let mut next = region;
        for_each_point(&chains, |h, rank| {
            let r = (h >> 24) as usize;
            let i = next[r] as usize;
            (slots[i], ranks[i]) = (h, rank as u16);
            next[r] += 1;
        });

        // Points dropped as duplicates, per rank: a member is live unless it
        // lost all of its points.
        let mut lost = vec![0u32; by_rank.len()];
        let mut index = vec![0u32; (1 << 16) + 1];
        let mut sorter = RegionSorter::new();
        // Slots written so far; never past the region being read, and the
        // sorter works on its own copy of that region.
        let mut out = 0;
        // Index entries 0..=bucket are filled in.
        let mut bucket = 0;
        for r in 0..256 {
            let (lo, hi) = (region[r] as usize, region[r + 1] as usize);
            let sorted = sorter.sort(&slots[lo..hi], &ranks[lo..hi]);
            // The key of the point last kept; u64::MAX matches no hash.
            let mut kept = u64::MAX;
            for &key in sorted {
                let (hash, rank) = ((key >> 16) as u32, key as u16);
                if key >> 16 == kept >> 16 {
                    // Equal hashes: keep the smaller rank.
                    let kept_rank = kept as u16;
                    let drop = if rank < kept_rank {
                        slots[out - 1] = hash << 16 | by_rank[usize::from(rank)] as u32;
                        kept = key;
                        kept_rank
                    } else {
                        rank
                    };
                    lost[usize::from(drop)] += 1;
                    continue;
                }
                kept = key;
                let b = (hash >> 16) as usize;
                if b != bucket {
                    index[bucket + 1..=b].fill(out as u32);
                    bucket = b;
                }
                slots[out] = hash << 16 | by_rank[usize::from(rank)] as u32;
                out += 1;
            }
        }
        index[bucket + 1..].fill(out as u32);
        slots.truncate(out);

        Ring {
            index,
            slots,
            members: members.len(),
            live: (0..by_rank.len()).filter(|&r| lost[r] < chains[r].1).count(),
        }
    }

    /// The hash a key is placed by: crc32 of its bytes.
    pub fn hash_key(key: &[u8]) -> u32 {
        crc32fast::hash(key)
    }

    /// Index of the first point at or after `hash`, wrapping; None if empty.
    fn point_index(&self, hash: u32) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let b = (hash >> 16) as usize;
        let (lo, hi) = (self.index[b] as usize, self.index[b + 1] as usize);
        // `slot < hash << 16` exactly when the slot's low half is below the key's.
        let (bucket, low) = (&self.slots[lo..hi], hash << 16);
        // A bucket holds about points / 65,536 slots (32 for 1,000 backends
        // at 2,048 replicas: two or three cache lines). Counting them reads
        // those lines in parallel, where a binary search waits for each miss
        // in turn: 30-50% faster for a ring that doesn't fit in cache.
        let i = lo
            + if bucket.len() <= 64 {
                bucket.iter().map(|&s| usize::from(s < low)).sum::<usize>()
            } else {
                bucket.partition_point(|&s| s < low)
            };
        Some(if i == self.slots.len() { 0 } else { i })
    }

    /// The member owning point `i`.
    fn owner_at(&self, i: usize) -> u16 {
        self.slots[i] as u16
    }

    /// Full point hashes in ring order.
    fn hashes(&self) -> impl Iterator<Item = u32> + '_ {
        self.index.windows(2).enumerate().flat_map(move |(b, w)| {
            let slots = &self.slots[w[0] as usize..w[1] as usize];
            slots.iter().map(move |&s| (b as u32) << 16 | s >> 16)
        })
    }

    /// The member owning `key`. None only if the ring has no points.
    pub fn owner(&self, key: &[u8]) -> Option<usize> {
        self.owner_of_hash(Self::hash_key(key))
    }

    /// The member owning an already-computed key hash.
    pub fn owner_of_hash(&self, hash: u32) -> Option<usize> {
        self.point_index(hash).map(|i| usize::from(self.owner_at(i)))
    }

    /// Distinct members in ring order starting at the key's owner (owner
    /// first); every member with points is yielded exactly once. Starting
    /// costs one lookup; the first 8 members are remembered inline, after
    /// that a bitset of `members / 64` words is allocated.
    pub fn walk(&self, key: &[u8]) -> Walk<'_> {
        self.walk_from_hash(Self::hash_key(key))
    }

    /// [`Ring::walk`] for an already-computed key hash.
    pub fn walk_from_hash(&self, hash: u32) -> Walk<'_> {
        let start = self.point_index(hash).unwrap_or(0);
        Walk { ring: self, pos: start, steps: 0, left: self.live, first: [0; 8], nfirst: 0, seen: Vec::new() }
    }

    /// The owner of every point in ring order, starting at the key's point
    /// and going once around: the points nginx steps through (`hash++`)
    /// when a key's server is unusable. Empty if the ring is.
    pub fn point_owners(&self, key: &[u8]) -> impl Iterator<Item = usize> + '_ {
        let start = self.point_of(Self::hash_key(key)).unwrap_or(0);
        (0..self.slots.len()).map(move |k| self.owner_of_point(start + k))
    }

    /// The point owning `hash`, as an index for [`Ring::owner_of_point`];
    /// `None` if the ring is empty.
    pub fn point_of(&self, hash: u32) -> Option<usize> {
        self.point_index(hash)
    }

    /// The member owning point `i`, counted around the ring (`i` may pass
    /// the last point). The ring must not be empty.
    pub fn owner_of_point(&self, i: usize) -> usize {
        usize::from(self.owner_at(i % self.slots.len()))
    }

    /// Fraction of the 2^32 hash space each member owns, indexed like the
    /// members given to [`Ring::new`]; sums to 1.0 unless the ring is empty.
    pub fn shares(&self) -> Vec<f64> {
        let mut arcs = vec![0u64; self.members];
        let Some(mut prev) = self.hashes().last() else {
            return vec![0.0; self.members];
        };
        // Point i owns (h[i-1], h[i]]; point 0 owns (h[last], 2^32) and [0, h[0]].
        for (i, hash) in self.hashes().enumerate() {
            let arc = if self.slots.len() == 1 { 1 << 32 } else { u64::from(hash.wrapping_sub(prev)) };
            arcs[usize::from(self.owner_at(i))] += arc;
            prev = hash;
        }
        arcs.iter().map(|&a| a as f64 / (1u64 << 32) as f64).collect()
    }

    /// Number of points on the ring (after dropping duplicate hashes).
    pub fn points(&self) -> usize {
        self.slots.len()
    }

    /// Number of members given to [`Ring::new`], with or without points.
    pub fn members(&self) -> usize {
        self.members
    }

    /// True if the ring has no points, so [`Ring::owner`] returns None.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// Distinct members in ring order: the iterator behind [`Ring::walk`].
#[derive(Debug)]
pub struct Walk<'a> {
    ring: &'a Ring,
    /// Next point to look at.
    pos: usize,
    /// Points looked at so far (stop after a full turn).
    steps: usize,
    /// Members with points not yet yielded.
    left: usize,
    /// The first members yielded, while `seen` is still empty.
    first: [u16; 8],
    nfirst: usize,
    /// Bitset of yielded members, allocated once `first` is full.
    seen: Vec<u64>,
}

impl Walk<'_> {
    /// Records `owner` as yielded; false if it already was.
    fn mark(&mut self, owner: u16) -> bool {
        if self.seen.is_empty() {
            if self.first[..self.nfirst].contains(&owner) {
                return false;
            }
            if self.nfirst < self.first.len() {
                self.first[self.nfirst] = owner;
                self.nfirst += 1;
                return true;
            }
            self.seen = vec![0; self.ring.members.div_ceil(64)];
            for m in self.first {
                self.seen[usize::from(m) / 64] |= 1 << (m % 64);
            }
        }
        let (word, bit) = (usize::from(owner) / 64, 1u64 << (owner % 64));
        let new = self.seen[word] & bit == 0;
        self.seen[word] |= bit;
        new
    }
}

impl Iterator for Walk<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let n = self.ring.slots.len();
        while self.left > 0 && self.steps < n {
            let owner = self.ring.owner_at(self.pos);
            self.steps += 1;
            self.pos = if self.pos + 1 == n { 0 } else { self.pos + 1 };
            if self.mark(owner) {
                self.left -= 1;
                return Some(usize::from(owner));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(ids: &[&str], weights: &[u32], replicas: u32) -> Ring {
        let members: Vec<Member> =
            ids.iter().zip(weights).map(|(id, &weight)| Member { identity: id.as_bytes(), weight }).collect();
        Ring::new(&members, replicas)
    }

    #[test]
    fn point_chain_is_pinned() {
        // Point 0 hashes the identity then four zero bytes; each next point
        // hashes the identity then the previous point's little-endian bytes.
        let p: Vec<u32> = point_hashes(b"app-1", 3).collect();
        assert_eq!(p[0], crc32fast::hash(b"app-1\0\0\0\0"));
        let mut second = b"app-1".to_vec();
        second.extend_from_slice(&p[0].to_le_bytes());
        assert_eq!(p[1], crc32fast::hash(&second));
        assert_eq!(p, [0xca5a472c, 0x6e8e529f, 0x4f4bb59a]);
    }

    use crate::util::rng::SplitMix64 as Rng;

    #[test]
    fn crc_feed4_matches_crc32fast() {
        let mut rng = Rng::new(7);
        for i in 0..20_000 {
            let len = (rng.next_u64() % 48) as usize;
            let identity: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            // Every byte value in every position, then random words.
            let prev = if i < 1024 { (i as u32 & 0xff) << (8 * (i / 256)) } else { rng.next_u64() as u32 };
            let mut base = crc32fast::Hasher::new();
            base.update(&identity);
            let mut h = base.clone();
            h.update(&prev.to_le_bytes());
            assert_eq!(first_point(&identity) ^ crc_feed4(prev), h.finalize(), "{identity:?} {prev:#x}");
        }
    }

    #[test]
    fn for_each_point_walks_every_chain() {
        let ids = ["a", "b", "", "app-1", "c", "d", "e", "f", "g"];
        let counts = [5, 0, 1, 300, 7, 7, 7, 2048, 3];
        let chains: Vec<(u32, u32)> = ids.iter().zip(counts).map(|(id, n)| (first_point(id.as_bytes()), n)).collect();
        let mut got = vec![Vec::new(); ids.len()];
        for_each_point(&chains, |h, rank| got[rank as usize].push(h));
        for (rank, (id, n)) in ids.iter().zip(counts).enumerate() {
            let want: Vec<u32> = point_hashes(id.as_bytes(), n).collect();
            assert_eq!(got[rank], want, "{id}");
        }
    }

    /// The build as first written: a comparison sort of all points by
    /// (hash, identity, member) or (hash, member), keeping the first of
    /// equal hashes.
    fn reference_build(members: &[Member<'_>], replicas: u32, ties: Ties) -> Ring {
        let members = &members[..members.len().min(MAX_MEMBERS)];
        let counts = point_counts(members, replicas);
        let mut points: Vec<(u32, u16)> = Vec::new();
        for (i, (m, &count)) in members.iter().zip(&counts).enumerate() {
            points.extend(point_hashes(m.identity, count).map(|h| (h, i as u16)));
        }
        points.sort_unstable_by(|a, b| {
            a.0.cmp(&b.0).then_with(|| {
                let (ia, ib) = (members[a.1 as usize].identity, members[b.1 as usize].identity);
                match ties {
                    Ties::SmallerIdentity => ia.cmp(ib).then(a.1.cmp(&b.1)),
                    Ties::FirstListed => a.1.cmp(&b.1),
                }
            })
        });
        points.dedup_by_key(|p| p.0);
        let mut index = vec![0u32; (1 << 16) + 1];
        let mut has_point = vec![false; members.len()];
        for &(hash, owner) in &points {
            index[(hash >> 16) as usize + 1] += 1;
            has_point[owner as usize] = true;
        }
        for b in 1..index.len() {
            index[b] += index[b - 1];
        }
        Ring {
            index,
            slots: points.iter().map(|&(h, o)| h << 16 | u32::from(o)).collect(),
            members: members.len(),
            live: has_point.iter().filter(|&&b| b).count(),
        }
    }

    fn assert_same_ring(members: &[Member<'_>], replicas: u32) {
        for ties in [Ties::SmallerIdentity, Ties::FirstListed] {
            let (got, want) = (Ring::with_ties(members, replicas, ties), reference_build(members, replicas, ties));
            assert_eq!(got.members, want.members);
            assert_eq!(got.live, want.live, "live members, {ties:?}");
            assert_eq!(got.slots.len(), want.slots.len(), "points, {ties:?}");
            assert!(got.slots == want.slots, "slots differ, {ties:?}");
            assert!(got.index == want.index, "index differs, {ties:?}");
        }
    }

    #[test]
    fn build_matches_a_comparison_sort() {
        let mut rng = Rng::new(42);
        // Small random rings; identities from a tiny alphabet, so many
        // members share an identity (and so all their points).
        for _ in 0..60 {
            let n = (rng.next_u64() % 12) as usize;
            let ids: Vec<Vec<u8>> = (0..n)
                .map(|_| (0..rng.next_u64() % 3).map(|_| b"ab\0"[(rng.next_u64() % 3) as usize]).collect())
                .collect();
            let members: Vec<Member> =
                ids.iter().map(|id| Member { identity: id, weight: (rng.next_u64() % 4) as u32 }).collect();
            assert_same_ring(&members, 1 + (rng.next_u64() % 700) as u32);
        }
        // Rings big enough for the radix sort, where distinct identities
        // also collide (about n² / 2^33 pairs), listed in either order.
        let mut ids: Vec<String> = (0..160).map(|i| format!("m{i}")).collect();
        ids.push("m7".into());
        let weight = |id: &str| id.len() as u32 % 2 + 1;
        let distinct: u32 = ids[..160].iter().map(|id| weight(id)).sum();
        for _ in 0..2 {
            let members: Vec<Member> =
                ids.iter().map(|id| Member { identity: id.as_bytes(), weight: weight(id) }).collect();
            let ring = Ring::new(&members, DEFAULT_REPLICAS);
            let distinct = (distinct * DEFAULT_REPLICAS) as usize;
            assert!(ring.points() < distinct, "no two members collided");
            assert_same_ring(&members, DEFAULT_REPLICAS);
            ids.reverse();
        }
    }

    #[test]
    fn a_tie_goes_to_the_smaller_identity_even_if_met_later() {
        // "a" and "b14" share a hash: point 17,326 of "a" but point 1,206
        // of "b14", so the build generates the larger identity's first.
        let hash = 0x6571_3b95;
        assert_eq!(point_hashes(b"a", 17_327).last(), Some(hash));
        assert_eq!(point_hashes(b"b14", 1_207).last(), Some(hash));
        let ids = ["c0", "c1", "b14", "a"];
        let members: Vec<Member> = ids.iter().map(|id| Member { identity: id.as_bytes(), weight: 1 }).collect();
        let replicas = 1 << 17;
        let r = Ring::new(&members, replicas);
        // The hash's region is big enough for the radix sort.
        let region = r.index[0x6600] - r.index[0x6500];
        assert!(region as usize >= RegionSorter::RADIX_MIN, "{region}");
        assert_eq!(r.owner_of_hash(hash), Some(3));
        assert_same_ring(&members, replicas);
    }

    #[test]
    fn first_listed_ties_go_to_the_earlier_member() {
        // The same colliding pair as above: listed first wins, whatever the
        // identities.
        let hash = 0x6571_3b95;
        for (ids, winner) in [(["b14", "a"], 0), (["a", "b14"], 0)] {
            let members: Vec<Member> = ids.iter().map(|id| Member { identity: id.as_bytes(), weight: 1 }).collect();
            let r = Ring::with_ties(&members, 1 << 17, Ties::FirstListed);
            assert_eq!(r.owner_of_hash(hash), Some(winner), "{ids:?}");
        }
    }

    #[test]
    fn nginx_identity_splits_like_nginx() {
        for (server, host, port) in [
            ("10.0.0.5:8080", "10.0.0.5", "8080"),
            ("[::1]:9000", "[::1]", "9000"),
            ("[::1]", "[::1]", ""),
            ("app.internal", "app.internal", ""),
            ("app.internal:80", "app.internal", "80"),
            ("unix:/run/app.sock", "/run/app.sock", ""),
            ("UNIX:/run/app:80", "/run/app:80", ""),
            ("host:", "host", ""),
            (":80", "", "80"),
            ("a:b:12", "a:b", "12"),
            ("a:1x", "a:1x", ""),
            ("", "", ""),
        ] {
            assert_eq!(nginx_identity(server), format!("{host}\0{port}").as_bytes(), "{server}");
        }
    }

    #[test]
    fn point_owners_go_once_around_from_the_key() {
        let r = ring(&["a", "b", "c"], &[1, 1, 1], 5);
        let all: Vec<usize> = (0..r.points()).map(|i| usize::from(r.owner_at(i))).collect();
        let key = b"k";
        let start = r.point_index(Ring::hash_key(key)).expect("points");
        let got: Vec<usize> = r.point_owners(key).collect();
        assert_eq!(got.len(), r.points());
        assert_eq!(got[..r.points() - start], all[start..]);
        assert_eq!(got[r.points() - start..], all[..start]);
        assert_eq!(got[0], r.owner(key).expect("owner"));
    }

    #[test]
    fn build_matches_a_comparison_sort_at_max_members() {
        let ids: Vec<String> = (0..MAX_MEMBERS + 1).map(|i| format!("{}", i % 60_000)).collect();
        let members: Vec<Member> = ids.iter().map(|id| Member { identity: id.as_bytes(), weight: 1 }).collect();
        assert_same_ring(&members, 1);
    }

    #[test]
    fn points_are_sorted_distinct_and_indexed() {
        let r = ring(&["a", "b", "c"], &[1, 2, 1], 300);
        let hashes: Vec<u32> = r.hashes().collect();
        assert_eq!(hashes.len(), r.points());
        assert!(hashes.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(r.index.len(), (1 << 16) + 1);
        assert_eq!(r.index[1 << 16] as usize, r.points());
        let mut all: Vec<u32> =
            [("a", 300), ("b", 600), ("c", 300)].iter().flat_map(|&(id, n)| point_hashes(id.as_bytes(), n)).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(hashes, all);
    }

    #[test]
    fn lookup_matches_linear_scan() {
        let r = ring(&["app-1", "app-2", "app-3", "app-4"], &[1, 1, 3, 1], 500);
        let points: Vec<(u32, u16)> = r.hashes().enumerate().map(|(i, h)| (h, r.owner_at(i))).collect();
        let naive = |h: u32| {
            let p = points.iter().find(|p| p.0 >= h).unwrap_or(&points[0]);
            usize::from(p.1)
        };
        // Every point, its neighbours, bucket edges and the ends of the space.
        let mut probes = vec![0, 1, u32::MAX, u32::MAX - 1];
        for &(h, _) in &points {
            probes.extend([h, h.wrapping_sub(1), h.wrapping_add(1)]);
        }
        for b in (0..1u32 << 16).step_by(97) {
            probes.extend([b << 16, (b << 16).wrapping_sub(1), b << 16 | 0xffff]);
        }
        for h in probes {
            assert_eq!(r.owner_of_hash(h), Some(naive(h)), "hash {h:#x}");
        }
    }

    #[test]
    fn equal_hashes_go_to_the_smaller_identity() {
        // Same identity means the same points: the earlier member wins all.
        let r = ring(&["x", "x"], &[1, 1], 10);
        assert_eq!(r.points(), 10);
        assert!((0..r.points()).all(|i| r.owner_at(i) == 0));
        // Distinct identities whose chains never collide: nothing dropped.
        let r = ring(&["b", "a"], &[1, 1], 10);
        assert_eq!(r.points(), 20);
    }

    #[test]
    fn point_counts_saturate_in_proportion() {
        let m = |weight| Member { identity: b"m", weight };
        assert_eq!(point_counts(&[m(1), m(3), m(0)], 160), [160, 480, 0]);
        let c = point_counts(&[m(u32::MAX), m(u32::MAX / 2), m(0)], u32::MAX);
        assert!(c.iter().map(|&n| u64::from(n)).sum::<u64>() <= u64::from(MAX_POINTS));
        assert!(c[0].abs_diff(MAX_POINTS / 3 * 2) <= 2);
        assert!((c[0] / 2).abs_diff(c[1]) <= 1);
        assert_eq!(c[2], 0);
    }

    #[test]
    fn single_point_owns_everything() {
        let r = ring(&["solo"], &[1], 1);
        assert_eq!(r.points(), 1);
        assert_eq!(r.shares(), [1.0]);
        for h in [0, 1 << 31, u32::MAX] {
            assert_eq!(r.owner_of_hash(h), Some(0));
        }
    }

    #[test]
    fn walk_switches_to_a_bitset_after_eight_members() {
        let ids: Vec<String> = (0..100).map(|i| format!("m{i}")).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let r = ring(&ids, &[1; 100], 16);
        let mut walked: Vec<usize> = r.walk(b"key").collect();
        assert_eq!(walked.len(), 100);
        walked.sort_unstable();
        assert_eq!(walked, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn debug_is_a_summary() {
        let r = ring(&["a", "b"], &[1, 0], 4);
        assert_eq!(format!("{r:?}"), "Ring { members: 2, live: 1, points: 4, .. }");
    }
}
