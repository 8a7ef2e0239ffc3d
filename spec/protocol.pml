/* The outbox protocol of the profile service, for spin: one user's versions, the API's PUT and
 * DELETE, two workers, an operator's replay, the time that ends leases, the collector with its grace
 * period, reconciliation, and a reader; with VARIANTS also the variant walk, which gives a live
 * version a variant the configuration gained later, made and attached by an add_variants intent.
 * spec/README.md maps every step to its named query in service/core/sql/queries.sql and says what
 * is abstracted away.
 *
 * Properties (assertions, named in pan's message; EventuallyClean is the ltl formula below):
 *   ConsistentReads    a read that succeeds gets the bytes of the version it read the pointer of
 *   NoDanglingPointer  a live version's blob (and its verified variant's) is in the bucket in every
 *                      state, and a reader finds the blob of the live pointer it read (the grace
 *                      period covers reads in flight)
 *   NoResurrection     nothing at or below a tombstone goes live, or is read by a read begun after it
 *   MonotonicLive      the live pointer only moves forward
 *   FencedCompletion   only the holder of the current lease completes an intent
 *   NoOverwrite        an upload never overwrites the object of the live version's key
 *   DeadKeysStayDead   the holder of the current lease never uploads to a key scheduled for deletion
 *                      (for an add_variants intent: while its version is live)
 *   SafeDeletion       a deletion is claimed only when no live or pending version needs the key
 *   PublishedStays     a published version never fails: an add_variants intent's death leaves it be
 *   EventuallyClean    []<> the bucket holds exactly the keys of live and pending versions
 *
 * Guards are on by default; a negative lane (spec/lanes/) switches one off with a #define:
 *   NO_FENCE           publish_intents does not compare the lease token
 *   NO_CREATE_ONLY     the upload overwrites an existing object (no If-None-Match: *)
 *   NO_FRESH_KEY       replay of a dead intent keeps the version's old, scheduled key
 *   SNAPSHOT_KEY       the claim returns the blob key of its statement snapshot, not of the locked row
 *   NO_KEY_GUARD       publish_intents does not check that the version still names the uploaded key
 *   NO_GRACE           the collector claims a deletion without waiting for the grace period
 *   GRACE_FROM_INSERT  the grace period starts inside the scheduling transaction, before it commits
 *   NO_RECHECK         claiming a deletion does not re-check that no live or pending version needs it
 *   LIVE_SNAPSHOT      publish_intents compares with the snapshot's live pointer, not the locked row's
 *   NO_TOMBSTONE_CHECK the versioned-image read ignores a tombstone above the version
 *   NO_RECONCILE       nobody lists the bucket
 *   USER_KEY           a version's blob key is derived from the user id alone
 * and, with VARIANTS, for the add_variants intents:
 *   NO_ATTACH_FENCE    attach_variants does not compare the lease token
 *   NO_ATTACH_KEY      attach_variants does not check that the row still names the uploaded key
 *   NO_ATTACH_LIVE     attach_variants attaches whether or not the version is still live
 *   NO_DEATH_GUARD     an add_variants intent that dies fails its version (no `purpose = 'publish'`)
 *   SNAPSHOT_VARIANT_KEY the claim returns the variant key of its snapshot (version_variants), not of
 *                      the locked intent row (variant_keys)
 * Size and scope: MAXV (2 or 3 versions); VARIANTS with WALKS walk steps (1 or 2); NO_OBSERVERS
 * drops the reader and the monitor (they change nothing the liveness property depends on, beyond
 * delaying a grace period); NO_OPERATOR drops the replay (the two-step walk is checked without it,
 * see spec/README.md).
 * Statements marked @reach must all execute in the positive lanes (scripts/model-check checks it);
 * those marked @defence are second lines of defence, reported when they are never needed.
 */

#ifndef MAXV
#define MAXV 2          /* version numbers 1..MAXV: PUTs and DELETE tombstones (2 or 3) */
#endif
#ifdef VARIANTS
#ifndef WALKS
#define WALKS 1         /* steps of the walk: the first adds the variant, a second re-keys it */
#endif
#if WALKS > 1 && !defined(NO_OPERATOR)
#error the two-step walk is modelled without the replay: define NO_OPERATOR
#endif
#else
#define WALKS 0
#endif
#define WALKED 1                /* the version the walk reaches while it is live */
#define NI (MAXV + WALKS)       /* intents: 1..MAXV publish version i; then each walk step's add_variants */
#define NK (MAXV + 1 + WALKS)   /* blob keys 1..NK: one per PUT and per walk step, one for a replay */
#define IS_AV(i) ((i) > MAXV)
#define VERSION_OF(i) (IS_AV(i) -> WALKED : (i))
#define VBYTES(v) ((v) + 8)         /* the bytes of version v's variant, as the bucket holds them */
#ifndef MAX_ATTEMPTS
#define MAX_ATTEMPTS 1  /* every lost lease is the final attempt: the next claim kills the intent */
#endif

/* versions.kind and versions.state */
#define K_PUT 1
#define K_DEL 2
#define V_PENDING 1
#define V_PUBLISHED 2
#define V_SUPERSEDED 3
#define V_FAILED 4
/* intents.state */
#define I_PENDING 1
#define I_PROGRESS 2
#define I_DONE 3
#define I_SUPERSEDED 4
#define I_DEAD 5
/* blob_deletions: SCHED and LEASED are both state 'scheduled' in the database */
#define D_NONE 0
#define D_SCHED 1       /* scheduled; its grace period runs from its first sighting */
#define D_LEASED 2      /* claimed by the collector (leased_until set), S3 delete not yet done */
#define D_DELETED 3
#define D_KEPT 4

/* Which properties are checked: all of them, unless a lane names one (-DONLY_ONE -DCHK_<name>=1). */
#ifdef ONLY_ONE
#define CHK_DEFAULT 0
#else
#define CHK_DEFAULT 1
#endif
#ifndef CHK_ConsistentReads
#define CHK_ConsistentReads CHK_DEFAULT
#endif
#ifndef CHK_NoDanglingPointer
#define CHK_NoDanglingPointer CHK_DEFAULT
#endif
#ifndef CHK_NoResurrection
#define CHK_NoResurrection CHK_DEFAULT
#endif
#ifndef CHK_MonotonicLive
#define CHK_MonotonicLive CHK_DEFAULT
#endif
#ifndef CHK_FencedCompletion
#define CHK_FencedCompletion CHK_DEFAULT
#endif
#ifndef CHK_NoOverwrite
#define CHK_NoOverwrite CHK_DEFAULT
#endif
#ifndef CHK_DeadKeysStayDead
#define CHK_DeadKeysStayDead CHK_DEFAULT
#endif
#ifndef CHK_SafeDeletion
#define CHK_SafeDeletion CHK_DEFAULT
#endif
#ifndef CHK_PublishedStays
#define CHK_PublishedStays CHK_DEFAULT
#endif
/* Hidden: not part of the state vector. Their names appear in pan's "assertion violated" line. */
hidden byte ConsistentReads = CHK_ConsistentReads;
hidden byte NoDanglingPointer = CHK_NoDanglingPointer;
hidden byte NoResurrection = CHK_NoResurrection;
hidden byte MonotonicLive = CHK_MonotonicLive;
hidden byte FencedCompletion = CHK_FencedCompletion;
hidden byte NoOverwrite = CHK_NoOverwrite;
hidden byte DeadKeysStayDead = CHK_DeadKeysStayDead;
hidden byte SafeDeletion = CHK_SafeDeletion;
hidden byte PublishedStays = CHK_PublishedStays;
#define CHECK(p, c) assert(!p || (c))

/* profiles */
byte live;                  /* live_version: 0 = none */
byte newest;                /* newest_version */
bit deleted;
byte max_tomb;              /* the newest tombstone's version (derived from versions, kept for brevity) */
/* versions, by version number */
byte vkind[MAXV + 1];
byte vstate[MAXV + 1];
byte vkey[MAXV + 1];
#ifdef VARIANTS
/* version_variants: the one variant the walk adds to a version that is (or was) live */
byte wkey[MAXV + 1];        /* its blob key (0 = no row) */
bit wver[MAXV + 1];         /* verified: measured, and served from then on */
#endif
/* intents: a version's publish intent (a tombstone has none) and, with VARIANTS, the add_variants
 * intent of each walk step. While one is unfinished (at most one is), the variant key it names
 * (variant_keys) is its row's: both change together, on replay. */
byte istate[NI + 1];
byte attempts[NI + 1];
byte holder[NI + 1];        /* lease_token: which worker's claim is current (0 = none) */
bit expired[NI + 1];        /* an in_progress intent whose lease ran out (next_attempt_at <= now()) */
/* blob_deletions, by key */
byte dstate[NK + 1];
bit dblock[NK + 1];         /* a read in flight when the grace period started: it must end first */
/* the bucket: bucket[k] is the version whose bytes key k holds, 0 if absent */
byte bucket[NK + 1];
byte nextkey;               /* new_blob_key: keys are never reused */
bit rbusy;                  /* the reader has read a pointer and not answered yet */

#define DUE(i) (istate[i] == I_PENDING || (istate[i] == I_PROGRESS && expired[i]))
#define LEASED_NOW(i) (istate[i] == I_PROGRESS && !expired[i])
#define UNFINISHED(i) (istate[i] == I_PENDING || istate[i] == I_PROGRESS)
#if WALKS == 2
#define WALK_BUSY (UNFINISHED(MAXV + 1) || UNFINISHED(MAXV + 2))   /* an add_variants intent in flight */
#else
#define WALK_BUSY UNFINISHED(MAXV + 1)
#endif
/* blob_is_needed: a key some pending or live version names (version_blobs: its image, its variants) */
#ifdef VARIANTS
#define NEEDS(v, k) ((vkey[v] == k || wkey[v] == k) && (vstate[v] == V_PENDING || live == v))
#else
#define NEEDS(v, k) (vkey[v] == k && (vstate[v] == V_PENDING || live == v))
#endif
#define SCHEDULED(k) (dstate[k] >= D_SCHED && dstate[k] <= D_LEASED)
#define LIVE_PUT (live != 0 && vkind[live] == K_PUT)
#ifdef VARIANTS
#define LIVE_KEY(k) (LIVE_PUT && (vkey[live] == k || (wver[live] && wkey[live] == k)))
#else
#define LIVE_KEY(k) (LIVE_PUT && vkey[live] == k)
#endif
#define EXISTS (newest > 0 && !deleted)
#define ORPHAN(k) (bucket[k] != 0 && !NEEDED(k) && !SCHEDULED(k))
#ifdef NO_GRACE
#define CLAIMABLE(k) (dstate[k] == D_SCHED)
#else
#define CLAIMABLE(k) (dstate[k] == D_SCHED && !dblock[k])   /* the grace period is over */
#endif
#ifdef NO_FENCE
#define FENCE(v, w) true
#else
#define FENCE(v, w) (holder[v] == w)
#endif
#ifdef NO_KEY_GUARD
#define KEY_GUARD(v, k) true
#else
#define KEY_GUARD(v, k) (vkey[v] == k && vstate[v] == V_PENDING)
#endif
#ifdef NO_TOMBSTONE_CHECK
#define BELOW_NO_TOMBSTONE(v) true
#else
#define BELOW_NO_TOMBSTONE(v) (v > max_tomb)
#endif
#define PUBLISHABLE(i, v, w, k) (istate[i] == I_PROGRESS && FENCE(i, w) && KEY_GUARD(v, k))
#ifdef NO_ATTACH_FENCE
#define ATTACH_FENCE(i, w) true
#else
#define ATTACH_FENCE(i, w) (holder[i] == w)
#endif
#ifdef NO_ATTACH_LIVE
#define ATTACH_LIVE(v) true
#else
#define ATTACH_LIVE(v) (live == v)
#endif
#ifdef NO_ATTACH_KEY
#define ATTACH_KEY(v, k) (k != 0)   /* something was uploaded for the variant, to whatever key */
#else
#define ATTACH_KEY(v, k) (k != 0 && wkey[v] == k)
#endif
#define IS_LEASED(k) (dstate[k] == D_LEASED)
/* PICK_n: choose one of 1..n for which C holds (blocks if there is none); ALL_n: C of each; UNBLOCK_n. */
#define ONE(x, C, n) :: C(n) -> x = n
#define PICK_2(x, C) if ONE(x, C, 1) ONE(x, C, 2) fi
#define PICK_3(x, C) if ONE(x, C, 1) ONE(x, C, 2) ONE(x, C, 3) fi
#define PICK_4(x, C) if ONE(x, C, 1) ONE(x, C, 2) ONE(x, C, 3) ONE(x, C, 4) fi
#define PICK_5(x, C) if ONE(x, C, 1) ONE(x, C, 2) ONE(x, C, 3) ONE(x, C, 4) ONE(x, C, 5) fi
#define PICK_6(x, C) if ONE(x, C, 1) ONE(x, C, 2) ONE(x, C, 3) ONE(x, C, 4) ONE(x, C, 5) ONE(x, C, 6) fi
#define ALL_3(P) (P(1) && P(2) && P(3))
#define ALL_4(P) (ALL_3(P) && P(4))
#define ALL_5(P) (ALL_4(P) && P(5))
#define ALL_6(P) (ALL_5(P) && P(6))
#define UNBLOCK_3 dblock[1] = 0; dblock[2] = 0; dblock[3] = 0
#define UNBLOCK_4 UNBLOCK_3; dblock[4] = 0
#define UNBLOCK_5 UNBLOCK_4; dblock[5] = 0
#define UNBLOCK_6 UNBLOCK_5; dblock[6] = 0
/* PICKV / PICKI / PICKK: a version / an intent / a key. */
#if MAXV == 2
#define PICKV(x, C) PICK_2(x, C)
#define NEEDED(k) (NEEDS(1, k) || NEEDS(2, k))
#define ALL_VERSIONS(P) (P(1) && P(2))
#elif MAXV == 3
#define PICKV(x, C) PICK_3(x, C)
#define NEEDED(k) (NEEDS(1, k) || NEEDS(2, k) || NEEDS(3, k))
#define ALL_VERSIONS(P) (P(1) && P(2) && P(3))
#else
#error MAXV must be 2 or 3
#endif
#if NI == 2
#define PICKI(x, C) PICK_2(x, C)
#elif NI == 3
#define PICKI(x, C) PICK_3(x, C)
#elif NI == 4
#define PICKI(x, C) PICK_4(x, C)
#elif NI == 5
#define PICKI(x, C) PICK_5(x, C)
#endif
#if NK == 3
#define PICKK(x, C) PICK_3(x, C)
#define ALL_KEYS(P) ALL_3(P)
#define UNBLOCK UNBLOCK_3
#elif NK == 4
#define PICKK(x, C) PICK_4(x, C)
#define ALL_KEYS(P) ALL_4(P)
#define UNBLOCK UNBLOCK_4
#elif NK == 5
#define PICKK(x, C) PICK_5(x, C)
#define ALL_KEYS(P) ALL_5(P)
#define UNBLOCK UNBLOCK_5
#elif NK == 6
#define PICKK(x, C) PICK_6(x, C)
#define ALL_KEYS(P) ALL_6(P)
#define UNBLOCK UNBLOCK_6
#else
#error at most 6 keys: MAXV + 1 + WALKS
#endif

/* Eventual cleanliness: the bucket holds exactly the keys a live or pending version needs. With
 * VARIANTS, said as: every key in the bucket is needed, and every live or pending version has its
 * blob, and its variant's once verified or while its add_variants intent is unfinished (the key of
 * one whose intent died before uploading is needed and may stay empty); shorter, for spin's ltl
 * parser. */
#ifdef VARIANTS
#define NO_GARBAGE(k) (bucket[k] == 0 || NEEDED(k))
#define HAS_BLOBS(v) ((vkey[v] == 0 || !(vstate[v] == V_PENDING || live == v) || bucket[vkey[v]] != 0) \
                      && (!(wkey[v] != 0 && live == v && (wver[v] || WALK_BUSY)) || bucket[wkey[v]] != 0))
#define CLEAN (ALL_KEYS(NO_GARBAGE) && ALL_VERSIONS(HAS_BLOBS))
#else
#define CLEAN_KEY(k) ((bucket[k] != 0) == NEEDED(k))
#define CLEAN ALL_KEYS(CLEAN_KEY)
#endif
ltl EventuallyClean { [] <> CLEAN }

/* INSERT INTO blob_deletions ... ON CONFLICT (blob_key) DO NOTHING, by the triggers
 * retire_unpublished_blob and retire_replaced_blob (migrations/*_structure.sql) at the end of the
 * statement that frees the key, so in its transaction. The grace period is longer than any read, so it is over once every read that was in
 * flight when it started has answered: dblock records whether the reader was in flight then. It
 * starts when a collector first sees the row (seen_at), at the earliest when this commits, so blk
 * is rbusy at the commit (GRACE_FROM_INSERT: at the insert, before the commit). */
inline schedule(key, blk) {
  if
  :: dstate[key] == D_NONE -> dstate[key] = D_SCHED; dblock[key] = blk
  :: else -> skip
  fi
}

/* Every blob of a version (version_blobs: its image and its variant's key as committed now). */
inline retire(ver, blk) {
  schedule(vkey[ver], blk);
#ifdef VARIANTS
  if :: wkey[ver] != 0 -> schedule(wkey[ver], blk) :: else -> skip fi
#endif
}

/* A version fails (its intent died): retire_unpublished_blob retires its blobs. */
inline fail_version(ver) {
  printf("MSC: v%d fails (live: %d); its blobs are scheduled for deletion\n", ver, live == ver);
  CHECK(PublishedStays, vstate[ver] != V_PUBLISHED);
  vstate[ver] = V_FAILED;
  retire(ver, rbusy)
}

active proctype Api() {
  byte v;
  do
  :: newest < MAXV ->
       if
       :: atomic {   /* accept_put: profile row locked, version, key and intent in one statement */
            newest++; v = newest;
            vkind[v] = K_PUT; vstate[v] = V_PENDING;
#ifdef USER_KEY
            nextkey = 1; vkey[v] = 1;   /* one key per user, whatever the version */
#else
            nextkey++; vkey[v] = nextkey;   /* new_blob_key(), committed before any upload */
#endif
            istate[v] = I_PENDING; deleted = 0;
            printf("MSC: api: PUT accepted as v%d, blob key K%d\n", v, vkey[v]);
            v = 0
          }
       :: EXISTS -> atomic {   /* lock_existing_profile + accept_delete */
            newest++; v = newest;
            vkind[v] = K_DEL; vstate[v] = V_PUBLISHED;
            if :: LIVE_PUT -> retire(live, rbusy) :: else -> skip fi;
            CHECK(MonotonicLive, v > live);
            printf("MSC: api: DELETE publishes tombstone v%d (live was v%d)\n", v, live);
            live = v; deleted = 1; max_tomb = v; v = 0
          }
       fi
  :: else -> break
  od;
  skip   /* @reach api-end */
}

/* Each step is one statement of workers/outbox.py: a transaction, or one request to the store. */
#ifdef NO_CREATE_ONLY
#define CREATE_ONLY_REFUSES(k) false
#else
#define CREATE_ONLY_REFUSES(k) (bucket[k] != 0)   /* If-None-Match: * answers 412 */
#endif
/* The key the claim returns: intents.blob_key, or (add_variants) intents.variant_keys, from the
 * intent row it holds locked; or, in a negative lane, the one of its statement snapshot. */
#ifdef SNAPSHOT_KEY
#define CLAIM_PUBLISH_KEY sk   /* the join with versions as of the snapshot */
#else
#define CLAIM_PUBLISH_KEY vkey[v]
#endif
#ifdef SNAPSHOT_VARIANT_KEY
#define CLAIM_VARIANT_KEY sk   /* version_variants as of the snapshot */
#else
#define CLAIM_VARIANT_KEY wkey[v]
#endif
#ifdef VARIANTS   /* the key the intent's version (or its variant row) names now */
#define ROW_KEY (IS_AV(i) -> wkey[v] : vkey[v])
#define CLAIMED_KEY (IS_AV(i) -> CLAIM_VARIANT_KEY : CLAIM_PUBLISH_KEY)
#else
#define ROW_KEY vkey[v]
#define CLAIMED_KEY CLAIM_PUBLISH_KEY
#endif

/* An intent dies (claim_intents' `failed`; fail_attempt's `marked` ends the same way): a publish
 * intent's version fails; an add_variants intent's leaves its version as it is, live without the
 * variant (the `purpose = 'publish'` guards). */
inline intent_dies(i, v) {
  istate[i] = I_DEAD; holder[i] = 0; expired[i] = 0;
#if defined(VARIANTS) && !defined(NO_DEATH_GUARD)
  if
  :: IS_AV(i) -> printf("MSC: v%d stays as it is\n", v)
  :: else -> fail_version(v)
  fi
#else
  fail_version(v)
#endif
}

#define RESET_WORKER i = 0; v = 0; k = 0; sl = 0; sup = 0; blk = 0
proctype Worker(byte w) {
  byte i, v, k, sk, sl; bit sup, blk;
end_idle:
  atomic {   /* claim_intents: the due scan, as of the statement's snapshot */
    PICKI(i, DUE); v = VERSION_OF(i);
    /* the final SELECT's p.live_version: already_superseded, or (add_variants) no longer live */
#ifdef VARIANTS
    if :: IS_AV(i) -> sup = (live != v) :: else -> sup = (live >= v) fi;
#else
    sup = (live >= v);
#endif
#if defined(SNAPSHOT_KEY) || defined(SNAPSHOT_VARIANT_KEY)
    sk = ROW_KEY;
#endif
    printf("MSC: worker %d: claim statement starts, its snapshot shows intent %d of v%d due (key K%d)\n", w, i, v, ROW_KEY)
  }
  atomic {   /* claim_intents: FOR UPDATE SKIP LOCKED re-checks the row as it is now */
    if
    :: DUE(i) && attempts[i] < MAX_ATTEMPTS ->
         istate[i] = I_PROGRESS; attempts[i]++; holder[i] = w; expired[i] = 0;
         k = CLAIMED_KEY;
         sk = 0;
         printf("MSC: worker %d: claims intent %d of v%d (attempt %d), to upload to K%d; the row names K%d\n", w, i, v, attempts[i], k, ROW_KEY);
#ifdef VARIANTS
         if :: sup && IS_AV(i) -> goto attach :: sup && !IS_AV(i) -> goto publish :: else -> skip fi   /* @reach claim */
#else
         if :: sup -> goto publish :: else -> skip fi   /* @reach claim */
#endif
    :: DUE(i) && attempts[i] >= MAX_ATTEMPTS ->
         /* the final attempt lost its lease: the intent dies here */
         printf("MSC: worker %d: intent %d of v%d dies at claim (final attempt lost its lease)\n", w, i, v);
         intent_dies(i, v);
         sk = 0; RESET_WORKER; goto end_idle   /* @reach death-at-claim */
    :: else -> sk = 0; RESET_WORKER; goto end_idle
    fi
  }
  atomic {   /* the staged bytes (read by the claim) in hand: the worker goes on, or dies; stopping when
              * the intent has finished meanwhile is a behaviour the code no longer has, a subset of dying */
    if
    :: istate[i] == I_DONE || istate[i] == I_SUPERSEDED ->
         RESET_WORKER; goto end_idle   /* as if it died here (no longer taken by the code) */
    :: !(istate[i] == I_DONE || istate[i] == I_SUPERSEDED) -> skip
    :: printf("MSC: worker %d: dies holding intent %d\n", w, i);   /* its lease will run out */
       RESET_WORKER; goto end_idle
    fi;
#ifdef VARIANTS
    if :: IS_AV(i) -> goto variant :: else -> skip fi
#endif
  }
  atomic {   /* BlobStore.put_once, then its verification */
    CHECK(DeadKeysStayDead, holder[i] != w || dstate[k] == D_NONE);
    if
    :: CREATE_ONLY_REFUSES(k) ->
         printf("MSC: worker %d: upload of v%d to K%d: 412, the key holds v%d\n", w, v, k, bucket[k])
    :: else ->
         CHECK(NoOverwrite, bucket[k] == 0 || !LIVE_KEY(k));
         bucket[k] = v;   /* @reach upload */
         printf("MSC: worker %d: uploads v%d to K%d\n", w, v, k)
    fi;
    if
    :: bucket[k] != v -> RESET_WORKER; goto end_idle   /* @defence upload-verification */
    :: else -> skip
    fi
  }
publish:
#ifdef GRACE_FROM_INSERT
  atomic {   /* clock_timestamp() of the retired row, taken before the commit */
    blk = rbusy;
    printf("MSC: worker %d: publish of v%d inserts its deletion row; the grace period starts\n", w, v)
  }
#endif
#ifdef LIVE_SNAPSHOT
  atomic {   /* the profile CTE without FOR UPDATE: the snapshot's live_version */
    sl = live;
    printf("MSC: worker %d: publish of v%d starts, its snapshot shows v%d live\n", w, v, live)
  }
#endif
  atomic {   /* publish_intents */
    if
    :: PUBLISHABLE(i, v, w, k) ->
         CHECK(FencedCompletion, holder[i] == w);
#ifndef LIVE_SNAPSHOT
         sl = live;
#endif
#ifndef GRACE_FROM_INSERT
         blk = rbusy;
#endif
         if
         :: sl == 0 || v > sl ->
              CHECK(MonotonicLive, v > live);
              CHECK(NoResurrection, v > max_tomb);
              istate[i] = I_DONE; vstate[v] = V_PUBLISHED;
              if :: LIVE_PUT -> retire(live, blk) :: else -> skip fi;
              printf("MSC: worker %d: publishes v%d live (key K%d; was v%d)\n", w, v, vkey[v], live);
              live = v   /* @reach publish-done */
         :: else ->
              istate[i] = I_SUPERSEDED; vstate[v] = V_SUPERSEDED;
              retire(v, blk);   /* @reach publish-superseded */
              printf("MSC: worker %d: v%d superseded by v%d; K%d scheduled\n", w, v, live, vkey[v])
         fi;
         holder[i] = 0; expired[i] = 0
    :: else -> printf("MSC: worker %d: publish of v%d refused: lease lost\n", w, v)
    fi;
    RESET_WORKER; goto end_idle
  }
#ifdef VARIANTS
variant:
  atomic {   /* the published original read back and checked against its sha256, the variant made
              * from it and put_once (reading and uploading commute with every other step: one atomic
              * step loses no interleaving) */
    if
    :: bucket[vkey[v]] != v ->   /* gone: the attempt fails, and ends as a lost lease does */
         printf("MSC: worker %d: the original of v%d (K%d) is gone\n", w, v, vkey[v]);
         RESET_WORKER; goto end_idle   /* @reach original-gone */
    :: else -> skip
    fi;
    CHECK(DeadKeysStayDead, holder[i] != w || live != v || dstate[k] == D_NONE);
    if
    :: CREATE_ONLY_REFUSES(k) ->
         printf("MSC: worker %d: upload of v%d's variant to K%d: 412, the key holds %d\n", w, v, k, bucket[k])
    :: else ->
         CHECK(NoOverwrite, bucket[k] == 0 || !LIVE_KEY(k));
         bucket[k] = VBYTES(v);   /* @reach variant-upload */
         printf("MSC: worker %d: uploads v%d's variant to K%d\n", w, v, k)
    fi;
    if
    :: bucket[k] != VBYTES(v) -> RESET_WORKER; goto end_idle   /* @defence variant-upload-verification */
    :: else -> skip
    fi
  }
attach:
  atomic {   /* attach_variants: the profile read FOR SHARE, the intent fenced on the lease token */
    if
    :: istate[i] == I_PROGRESS && ATTACH_FENCE(i, w) ->
         printf("MSC: worker %d: attach to v%d (lease holder: worker %d)\n", w, v, holder[i]);
         CHECK(FencedCompletion, holder[i] == w);
         if
         :: ATTACH_LIVE(v) ->
              istate[i] = I_DONE;
              if
              :: ATTACH_KEY(v, k) ->
                   wver[v] = 1;   /* @reach attach-done */
                   printf("MSC: worker %d: v%d's variant attached: its row, naming K%d, verified (uploaded to K%d)\n", w, v, wkey[v], k)
              :: else ->   /* nothing uploaded, or the row names another key now */
                   printf("MSC: worker %d: intent of v%d done, nothing attached (K%d, row K%d)\n", w, v, k, wkey[v])   /* @defence attach-key-check */
              fi
         :: else ->
              istate[i] = I_SUPERSEDED;   /* @reach attach-superseded */
              printf("MSC: worker %d: v%d is no longer live (v%d is): nothing attached\n", w, v, live)
         fi;
         holder[i] = 0; expired[i] = 0
    :: else -> printf("MSC: worker %d: attach to v%d refused: lease lost\n", w, v)
    fi;
    RESET_WORKER; goto end_idle
  }
#endif
}

init {
  atomic { run Worker(1); run Worker(2) }
}

/* `profiles intents replay` of one intent, at any moment: lock_intent_for_replay, then (dead only)
 * give_fresh_key or, for add_variants, give_fresh_variant_keys, and replay_intent, in one
 * transaction. A refused replay (not found, leased, already pending or overtaken, finished)
 * changes nothing, so only those that go ahead are modelled. */
#define REPLAYABLE(i) (istate[i] == I_DEAD || (istate[i] == I_PROGRESS && expired[i]))
#ifndef NO_OPERATOR
active proctype Operator() {
  byte i, v;
end_operator:
  atomic {
    PICKI(i, REPLAYABLE); v = VERSION_OF(i);
    if
    :: istate[i] == I_DEAD && !IS_AV(i) ->
#ifndef NO_FRESH_KEY
         nextkey++; vkey[v] = nextkey;   /* the old key stays scheduled: dead for good */
#endif
         vstate[v] = V_PENDING;
         istate[i] = I_PENDING; attempts[i] = 0; holder[i] = 0;   /* @reach replay-dead */
         printf("MSC: operator: replays dead v%d, now pending with key K%d\n", v, vkey[v])
#ifdef VARIANTS
    :: istate[i] == I_DEAD && IS_AV(i) ->   /* its row is unverified and names the intent's key */
#ifndef NO_FRESH_KEY
         schedule(wkey[v], rbusy);   /* it may have uploaded there; the version stays live */
         nextkey++; wkey[v] = nextkey;
#endif
         istate[i] = I_PENDING; attempts[i] = 0; holder[i] = 0;   /* @reach replay-dead-variant */
         printf("MSC: operator: replays the dead add_variants intent of v%d, variant key now K%d\n", v, wkey[v])
#endif
    :: else ->   /* stuck: in_progress with an expired lease; its key was never scheduled */
         istate[i] = I_PENDING; attempts[i] = 0; holder[i] = 0; expired[i] = 0;   /* @reach replay-stuck */
         printf("MSC: operator: replays stuck intent %d\n", i)
    fi;
    i = 0; v = 0
  }
}
#endif

/* Time: a lease runs out (its worker paused past it, or died). */
active proctype Clock() {
  byte i;
end_clock:
  do
  :: atomic {
       PICKI(i, LEASED_NOW);
       expired[i] = 1;   /* @reach lease-expiry */
       printf("MSC: clock: the lease on intent %d runs out\n", i);
       i = 0
     }
  od
}

#ifdef VARIANTS
/* The variant walk: refresh_variants, one transaction under the profile's lock. The live put
 * version, if no add_variants intent of it is unfinished, gets its variant row with a fresh key
 * (unverified, so not served) and an add_variants intent naming that key. A second step stands for
 * a change of that variant's box or format in the configuration: the row is re-keyed (unverified
 * again) and its old key scheduled ('unconfigured'). find_variant_work only proposes versions
 * (refresh_variants re-checks everything), so it is not a step of its own. The walk reaches the
 * profile while v1 is live: a walk of v2, which nothing replaces, has only races that v1's has too
 * (v1 may also stay live for ever). */
active proctype Walker() {
  byte n, v;
end_walker:
  do
  :: atomic {
       n < WALKS && live == WALKED && vkind[WALKED] == K_PUT && !WALK_BUSY ->
       v = live;
#if WALKS > 1
       if
       :: wkey[v] != 0 -> schedule(wkey[v], rbusy)   /* @reach walk-rekey */
       :: else -> skip
       fi;
#endif
       nextkey++; wkey[v] = nextkey; wver[v] = 0;
       n++; istate[MAXV + n] = I_PENDING;   /* @reach walk */
       printf("MSC: walk: live v%d gets variant key K%d and add_variants intent %d\n", v, wkey[v], MAXV + n);
       v = 0
     }
  od
}
#endif

/* The collector: claims a deletion once its grace period is over, with the re-check
 * (claim_blob_deletions), then deletes from the bucket and finishes (finish_blob_deletion). */
active proctype Collector() {
  byte k;
end_collector:
  do
  :: atomic {
       PICKK(k, CLAIMABLE);
#ifndef NO_RECHECK
       if
       :: NEEDED(k) -> dstate[k] = D_KEPT   /* @defence recheck-kept */
       :: else ->
#endif
            CHECK(SafeDeletion, !NEEDED(k));
            dstate[k] = D_LEASED;   /* @reach gc-claim */
            printf("MSC: collector: claims the deletion of K%d\n", k);
#ifndef NO_RECHECK
       fi;
#endif
       k = 0
     }
  :: atomic {
       PICKK(k, IS_LEASED);
       bucket[k] = 0; dstate[k] = D_DELETED;   /* @reach gc-delete */
       printf("MSC: collector: deletes K%d from the bucket\n", k);
       k = 0
     }
  od
}

/* Reconciliation: key_pages + classify_blob_keys, then schedule_blob_deletion, two statements. */
#ifndef NO_RECONCILE
active proctype Reconciler() {
  byte k;
end_reconciler:
  do
  :: atomic { PICKK(k, ORPHAN) }
     atomic {
       if
       :: !SCHEDULED(k) ->   /* ON CONFLICT ... DO UPDATE ... WHERE state <> 'scheduled' */
            dstate[k] = D_SCHED; dblock[k] = rbusy;   /* @reach reconcile-schedule */
            printf("MSC: reconciler: K%d is in the bucket and needed by nobody: scheduled\n", k)
       :: else -> skip
       fi;
       k = 0
     }
  od
}
#endif

#ifndef NO_OBSERVERS
/* One read at any moment: GET /image (get_live_version, then the blob, the pointer re-read
 * once if the blob is missing) or GET /versions/{n}/image (get_published_version, then the blob);
 * with VARIANTS either of them with ?variant=, served from the version's measured variants (a
 * verified row). A read that answers 404 at once touches nothing, so only reads that find a
 * pointer are modelled. With VARIANTS the reader reads only variants: a read of an original does
 * as in the other lanes, where nothing is different but the keys the triggers retire, and the
 * monitor still checks the live original in every state. */
#define READABLE(n) (vkind[n] == K_PUT && vstate[n] == V_PUBLISHED && BELOW_NO_TOMBSTONE(n))
#ifdef VARIANTS
#define READABLE_VARIANT(n) (READABLE(n) && wver[n])
#define READ_KEY(n) (variant -> wkey[n] : vkey[n])
#define BYTES(n) (variant -> VBYTES(n) : (n))
#define SERVES(n) (!variant || wver[n])   /* else 404 "Variant not yet made" */
#else
#define READ_KEY(n) vkey[n]
#define BYTES(n) (n)
#define SERVES(n) true
#endif
#define ANSWER rbusy = 0; UNBLOCK; rv = 0; rk = 0; t0 = 0; aslive = 0; versioned = 0; variant = 0
active proctype Reader() {
  byte rv, rk, t0; bit aslive, versioned, variant;
end_reader:
  atomic {
    if
#ifdef VARIANTS
    :: LIVE_PUT && wver[live] -> rv = live; variant = 1
    :: PICKV(rv, READABLE_VARIANT); versioned = 1; variant = 1
#else
    :: LIVE_PUT -> rv = live
    :: PICKV(rv, READABLE); versioned = 1
#endif
    fi;
    rk = READ_KEY(rv); aslive = (live == rv); rbusy = 1; t0 = max_tomb;
    printf("MSC: reader: reads v%d (live: %d, variant: %d), key K%d\n", rv, aslive, variant, rk)
  }
  atomic {
    if
    :: bucket[rk] != 0 ->
         CHECK(ConsistentReads, bucket[rk] == BYTES(rv));
         CHECK(NoResurrection, rv > t0);
         printf("MSC: reader: K%d holds %d: 200\n", rk, bucket[rk]);
         ANSWER; goto done   /* @reach read-200 */
    :: else ->
         printf("MSC: reader: K%d is not in the bucket\n", rk);
         CHECK(NoDanglingPointer, !aslive);
         if
         :: versioned -> ANSWER; goto done   /* @reach read-404-collected */
         :: else -> skip
         fi
    fi
  }
  atomic {   /* BlobNotFound: the pointer may just have moved; read it once more */
    if
    :: LIVE_PUT && SERVES(live) -> rv = live; rk = READ_KEY(live)   /* @defence reader-re-read */
    :: else -> ANSWER; goto done
    fi
  }
  atomic {
    if
    :: bucket[rk] != 0 -> CHECK(ConsistentReads, bucket[rk] == BYTES(rv))
    :: else -> CHECK(NoDanglingPointer, false)   /* 503 */
    fi;
    ANSWER
  }
done:
  skip   /* @reach reader-end */
}

/* A live version's blob, and its variant's once verified, is in the bucket, in every state. */
#ifdef VARIANTS
#define LIVE_WHOLE (!LIVE_PUT || (bucket[vkey[live]] == live && (!wver[live] || bucket[wkey[live]] == VBYTES(live))))
#else
#define LIVE_WHOLE (!LIVE_PUT || bucket[vkey[live]] == live)
#endif
active proctype Monitor() {
end_monitor:
  atomic {
    !LIVE_WHOLE ->
      printf("MSC: monitor: live v%d names a key that is not in the bucket\n", live);
      CHECK(NoDanglingPointer, false)
  }
}
#endif
