/* Conformance checks of the tie C API against a running server serving the example model
 * mlp64 (64 features, 1 output).
 *
 *   conformance SOCKET_DIR ENDPOINT FIXTURE_ROWS [disconnect]
 *
 * Run from the repository root (it reads layouts/features/).
 *
 * FIXTURE_ROWS: a text file, one row per line: 64 features then the expected output,
 * separated by spaces. Exits 0 and prints "ok: N checks" when every check passes.
 *
 * With "disconnect", the server's loss is checked instead, in steps driven by the caller: the
 * program connects and prints "connected"; after a line on stdin (the caller has stopped the
 * server) it submits a request and prints "submitted"; after another line (the caller has
 * killed the server) it expects that request back as DISCONNECTED and later submits refused. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tie.h"

#define FEATURES 64
#define MAX_ROWS 64

static int checks = 0;

#define CHECK(cond, ...)                                                     \
  do {                                                                       \
    checks++;                                                                \
    if (!(cond)) {                                                           \
      fprintf(stderr, "FAILED %s:%d: ", __FILE__, __LINE__);                 \
      fprintf(stderr, __VA_ARGS__);                                          \
      fprintf(stderr, " (last error: %s)\n", tie_last_error());              \
      exit(1);                                                               \
    }                                                                        \
  } while (0)

static int close_to(float a, float b) {
  float scale = fabsf(b) > 1.0f ? fabsf(b) : 1.0f;
  return fabsf(a - b) / scale <= 1e-5f;
}

static void wait_line(void) {
  char line[16];
  if (!fgets(line, sizeof line, stdin)) exit(3);
}

static int disconnect(TieClient *client, const float *row) {
  printf("connected\n");
  fflush(stdout);
  wait_line();
  uint64_t id;
  TieResult r = tie_submit(client, row, FEATURES, 1, 0, &id);
  CHECK(r == TIE_OK, "submit to a stopped server: %d", r);
  printf("submitted\n");
  fflush(stdout);
  wait_line();
  TieResponse resp;
  uint64_t give_up = tie_monotonic_ns() + 5000000000ull;
  int p;
  while ((p = tie_poll(client, &resp)) == 0) CHECK(tie_monotonic_ns() < give_up, "no answer in 5 s");
  CHECK(p == 1 && resp.request_id == id, "poll: %d", p);
  CHECK(strcmp(tie_status_name(resp.status), "DISCONNECTED") == 0, "status %s",
        tie_status_name(resp.status));
  r = tie_submit(client, row, FEATURES, 1, 0, NULL);
  CHECK(r == TIE_ERR_DISCONNECTED, "submit after the server died: %d", r);
  r = tie_predict(client, row, FEATURES, &resp);
  CHECK(r == TIE_ERR_DISCONNECTED, "predict after the server died: %d", r);
  tie_client_free(client);
  printf("ok: %d checks\n", checks);
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 4 && !(argc == 5 && strcmp(argv[4], "disconnect") == 0)) {
    fprintf(stderr, "usage: %s SOCKET_DIR ENDPOINT FIXTURE_ROWS [disconnect]\n", argv[0]);
    return 2;
  }
  static float rows[MAX_ROWS][FEATURES];
  static float expected[MAX_ROWS];
  int n = 0;
  FILE *f = fopen(argv[3], "r");
  CHECK(f != NULL, "cannot open %s", argv[3]);
  while (n < MAX_ROWS) {
    int i;
    for (i = 0; i < FEATURES; i++)
      if (fscanf(f, "%f", &rows[n][i]) != 1) break;
    if (i < FEATURES || fscanf(f, "%f", &expected[n]) != 1) break;
    n++;
  }
  fclose(f);
  CHECK(n > 0, "no rows in %s", argv[3]);

  TieConnectOptions options;
  memset(&options, 0, sizeof options);
  options.socket_dir = argv[1];
  options.response_capacity = 8;
  options.request_capacity = 8;
  options.timeout_us = 5000000;

  /* An unknown model is refused, with a message. */
  TieClient *client = NULL;
  TieResult r;
  if (argc == 5) {
    r = tie_connect(argv[2], "mlp64", &options, &client);
    CHECK(r == TIE_OK, "connect: %d", r);
    return disconnect(client, rows[0]);
  }
  r = tie_connect(argv[2], "no-such-model", &options, &client);
  CHECK(r == TIE_ERR_REFUSED, "unknown model: %d", r);
  CHECK(strlen(tie_last_error()) > 0, "no message for the refusal");

  /* A layout that is not the model's (two features swapped) is refused, naming both hashes;
   * the model's own layout is accepted. */
  options.layout_file = "layouts/features/mlp64_reordered.toml";
  r = tie_connect(argv[2], "mlp64", &options, &client);
  CHECK(r == TIE_ERR_REFUSED, "reordered layout: %d", r);
  CHECK(strstr(tie_last_error(), "layout") != NULL, "message: %s", tie_last_error());
  options.layout_file = "layouts/features/no-such-layout.toml";
  r = tie_connect(argv[2], "mlp64", &options, &client);
  CHECK(r == TIE_ERR_INVALID_ARGUMENT, "missing layout file: %d", r);
  options.layout_file = "layouts/features/mlp64.toml";
  r = tie_connect(argv[2], "mlp64", &options, &client);
  CHECK(r == TIE_OK, "connect: %d", r);
  CHECK(tie_feature_count(client) == FEATURES, "feature count %u", tie_feature_count(client));
  CHECK(tie_output_count(client) == 1, "output count %u", tie_output_count(client));

  /* predict, row by row. */
  TieResponse resp;
  for (int i = 0; i < n; i++) {
    r = tie_predict(client, rows[i], FEATURES, &resp);
    CHECK(r == TIE_OK, "predict row %d: %d", i, r);
    CHECK(resp.status == 0 && resp.output_count == 1, "row %d: status %s", i,
          tie_status_name(resp.status));
    CHECK(close_to(resp.outputs[0], expected[i]), "row %d: %g vs %g", i, resp.outputs[0],
          expected[i]);
    CHECK(resp.round_trip_ns > 0, "row %d: no round trip time", i);
  }

  /* Pipelined: submit up to the response ring's capacity, then poll them in order. */
  uint64_t ids[8];
  int sent = n < 8 ? n : 8;
  for (int i = 0; i < sent; i++) {
    r = tie_submit(client, rows[i], FEATURES, 1, 0, &ids[i]);
    CHECK(r == TIE_OK, "submit %d: %d", i, r);
  }
  CHECK(tie_in_flight(client) == (uint32_t)sent, "in flight %u", tie_in_flight(client));
  /* predict refuses to mix its answer with submitted ones. */
  r = tie_predict(client, rows[0], FEATURES, &resp);
  CHECK(r == TIE_ERR_REQUESTS_IN_FLIGHT, "predict with requests in flight: %d", r);
  if (sent == 8) {
    /* The ring holds 8: a ninth is refused before anything is sent. */
    r = tie_submit(client, rows[0], FEATURES, 1, 0, NULL);
    CHECK(r == TIE_ERR_QUEUE_FULL, "ninth submit: %d", r);
  }
  uint64_t give_up = tie_monotonic_ns() + 5000000000ull;
  for (int got = 0; got < sent;) {
    int p = tie_poll(client, &resp);
    CHECK(p >= 0, "poll: %d", p);
    if (p == 0) {
      CHECK(tie_monotonic_ns() < give_up, "no answer in 5 s");
      continue;
    }
    CHECK(resp.request_id == ids[got], "order: %llu vs %llu", (unsigned long long)resp.request_id,
          (unsigned long long)ids[got]);
    CHECK(close_to(resp.outputs[0], expected[got]), "pipelined row %d", got);
    got++;
  }
  CHECK(tie_poll(client, &resp) == 0, "a response nobody asked for");

  /* Bad input is refused at submit, with a message, and nothing is sent. */
  r = tie_submit(client, rows[0], FEATURES - 1, 1, 0, NULL);
  CHECK(r == TIE_ERR_WRONG_FEATURE_COUNT, "short row: %d", r);
  CHECK(strstr(tie_last_error(), "64") != NULL, "message names the count: %s", tie_last_error());
  float bad[FEATURES];
  memcpy(bad, rows[0], sizeof bad);
  bad[3] = NAN;
  r = tie_submit(client, bad, FEATURES, 1, 0, NULL);
  CHECK(r == TIE_ERR_NON_FINITE, "NaN: %d", r);
  r = tie_submit(client, rows[0], FEATURES, 7, 0, NULL);
  CHECK(r == TIE_ERR_INVALID_ARGUMENT, "priority 7: %d", r);
  CHECK(tie_in_flight(client) == 0, "refused requests counted in flight");

  /* A deadline already past: answered TIMEOUT, not run. */
  uint64_t id;
  r = tie_submit(client, rows[0], FEATURES, 1, tie_monotonic_ns() - 1, &id);
  CHECK(r == TIE_OK, "submit with a past deadline: %d", r);
  int p;
  give_up = tie_monotonic_ns() + 5000000000ull;
  while ((p = tie_poll(client, &resp)) == 0) CHECK(tie_monotonic_ns() < give_up, "no answer in 5 s");
  CHECK(p == 1, "poll: %d", p);
  CHECK(resp.request_id == id && strcmp(tie_status_name(resp.status), "TIMEOUT") == 0,
        "past deadline: %s", tie_status_name(resp.status));

  /* NULLs are errors, not crashes. */
  CHECK(tie_predict(NULL, rows[0], FEATURES, &resp) == TIE_ERR_INVALID_ARGUMENT, "NULL client");
  CHECK(tie_submit(client, NULL, FEATURES, 1, 0, NULL) == TIE_ERR_INVALID_ARGUMENT,
        "NULL features");

  tie_client_free(client);
  tie_client_free(NULL);
  printf("ok: %d checks\n", checks);
  return 0;
}
