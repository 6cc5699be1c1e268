//! TEMPORARY stub; replaced by the real ring from branch `ring`.
pub const DEFAULT_REPLICAS: u32 = 160;
pub struct Member<'a> {
    pub identity: &'a [u8],
    pub weight: u32,
}
#[derive(Clone, Debug)]
pub struct Ring {
    n: usize,
}
impl Ring {
    pub fn new(members: &[Member<'_>], _replicas: u32) -> Ring {
        Ring { n: members.len() }
    }
    pub fn hash_key(key: &[u8]) -> u32 {
        crc32fast::hash(key)
    }
    pub fn owner(&self, key: &[u8]) -> Option<usize> {
        (self.n > 0).then(|| Self::hash_key(key) as usize % self.n)
    }
    pub fn shares(&self) -> Vec<f64> {
        vec![1.0 / self.n as f64; self.n]
    }
}
