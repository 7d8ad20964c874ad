module mlxrunner/tests/ollamaclients

go 1.19
